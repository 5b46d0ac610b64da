"""How training micro-batches reach the auditor from a transformers ``Trainer``.

No Trainer event receives the batch or the loss. The callback finds its ``Trainer`` (the object whose
method fires the event: :func:`find_trainer`) and captures every training micro-batch where the Trainer
itself computes the loss:

* :class:`LossCapture` (the normal path) wraps ``trainer.compute_loss`` on the instance. It reads the
  batch the Trainer hands to ``compute_loss`` *before* the loss code runs (so labels that label smoothing,
  ``compute_loss_func`` or a custom ``compute_loss`` pop before the model's forward are still seen), and the
  loss ``compute_loss`` returns: the loss that is really back-propagated (TRL's own loss, a label-smoothed
  loss, a tuple model's ``outputs[0]``, a per-sample vector, DataParallel's per-device vector). It also
  tells whether the micro-batch is the last of its optimizer step (the Trainer sets accelerate's
  ``sync_gradients`` before each micro-batch), so the step can be judged *before that micro-batch's
  backward*: DeepSpeed applies its optimizer step inside ``backward``, long before
  ``on_pre_optimizer_step``.
* :class:`ForwardCapture` (the fallback, when no Trainer can be found) puts a forward hook on the model and
  reads the forward's keyword arguments and output; the step is then judged at ``on_pre_optimizer_step``.

Both hand a :class:`MicroBatch` to the callback. :func:`read_batch` keeps every field it can interpret and
names the ones it cannot (an encoder's ``attention_mask`` of another length, a 4D mask): a field it cannot
read never discards the labels or the loss. Nothing here reads a tensor's values (shapes only): no host
synchronisation.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

__all__ = ["MicroBatch", "read_batch", "loss_of_output", "find_trainer", "LossCapture", "ForwardCapture"]


@dataclass
class MicroBatch:
    """The fields of one training micro-batch the audit can read (tensors on their own device)."""

    labels: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    shift_labels: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    #: False for encoder-decoder models: labels are the decoder's targets, position for position (no shift).
    causal: bool = True
    #: fields present in the batch that could not be interpreted, with the reason (``name: why``)
    unread: list[str] = field(default_factory=list)
    #: the last micro-batch of its optimizer step (None: unknown)
    last: bool | None = None
    #: set on the row chunks of one micro-batch (``nn.DataParallel`` replicas seen by the forward hook):
    #: chunks sharing it are merged into one micro-batch by the auditor
    part_of: int | None = None


def _tensor(x: Any) -> torch.Tensor | None:
    return x if isinstance(x, torch.Tensor) else None


def read_batch(inputs: Mapping[str, Any], *, encoder_decoder: bool = False) -> MicroBatch:
    """The audit's view of a model input dict: what can be read, and what cannot (by name and reason).

    Labels decide all-masked on their own; attention masks, position ids and input ids refine the counts
    when their shape matches the labels, and are set aside with a reason otherwise.

    Example:
        >>> import torch
        >>> mb = read_batch({"labels": torch.zeros(2, 5, dtype=torch.long),
        ...                  "attention_mask": torch.ones(2, 1, 5, 5)})
        >>> mb.attention_mask is None, mb.unread
        (True, ['attention_mask: a 4-D tensor, not (batch, seq) like the labels'])
    """
    mb = MicroBatch(causal=not encoder_decoder)
    found: dict[str, torch.Tensor | None] = {}
    for name in ("labels", "shift_labels"):
        raw = inputs.get(name)
        t = _tensor(raw)
        if raw is not None and t is None:
            mb.unread.append(f"{name}: a {type(raw).__name__}, not a tensor")
        elif t is not None and (t.dim() not in (1, 2) or t.is_floating_point() or t.is_complex()):
            mb.unread.append(f"{name}: a {t.dim()}-D {t.dtype} tensor, not (batch, seq) integer labels")
            t = None
        found[name] = t
    labels, shift = found["labels"], found["shift_labels"]
    mb.labels, mb.shift_labels = labels, shift
    ref = shift if shift is not None else labels
    if ref is None:
        return mb
    shape = ref.shape if ref.dim() == 2 else (1, ref.shape[0])

    def same(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t2 = t.unsqueeze(0) if t.dim() == 1 else t
        if t2.dim() == 2 and tuple(t2.shape) == tuple(shape):
            return t
        # the reason is the same for every batch (no shapes): the summary counts each field once
        why = ("another shape than the labels" if t2.dim() == 2 else
               f"a {t2.dim()}-D tensor, not (batch, seq) like the labels")
        mb.unread.append(f"{name}: {why}")
        return None

    if encoder_decoder:
        # the encoder's attention_mask and input_ids describe another sequence: only decoder fields count
        mb.attention_mask = same("decoder_attention_mask", _tensor(inputs.get("decoder_attention_mask")))
        return mb
    mb.attention_mask = same("attention_mask", _tensor(inputs.get("attention_mask")))
    mb.position_ids = same("position_ids", _tensor(inputs.get("position_ids")))
    mb.input_ids = same("input_ids", _tensor(inputs.get("input_ids")))
    return mb


def loss_of_output(output: Any) -> torch.Tensor | None:
    """The loss in a model output as the Trainer reads it: ``output["loss"]`` for mappings and
    ``ModelOutput``, ``output[0]`` for tuples (models called with labels put their loss first)."""
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        try:
            loss = output["loss"] if "loss" in output else getattr(output, "loss", None)
        except (KeyError, TypeError):
            loss = getattr(output, "loss", None)
    elif isinstance(output, tuple | list) and output:
        loss = output[0]
    else:
        loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() >= 1 and loss.dim() <= 1:
        return loss.detach()
    return None


def find_trainer(max_depth: int = 16) -> Any | None:
    """The ``transformers.Trainer`` whose code called the current callback event (None if there is none).

    Callback events are fired by ``CallbackHandler`` from inside a Trainer method (``__init__`` for
    ``on_init_end``, the training loop for the others); the Trainer is that method's ``self``.
    """
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover - the callback needs transformers anyway
        return None
    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _is_encoder_decoder(model: Any) -> bool:
    seen: set[int] = set()
    m = model
    while m is not None and id(m) not in seen:  # DDP / FSDP / PEFT wrappers hold the model in .module / .model
        seen.add(id(m))
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "is_encoder_decoder", False):
            return True
        m = getattr(m, "module", None) or getattr(m, "base_model", None) or getattr(m, "model", None)
        if not isinstance(m, torch.nn.Module):
            break
    return False


Sink = Callable[[MicroBatch], None]


def _forward_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    inputs = dict(kwargs)
    if "input_ids" not in inputs and args and isinstance(args[0], torch.Tensor):
        inputs["input_ids"] = args[0]
    return inputs


class LossCapture:
    """Wrap ``trainer.compute_loss`` on the instance; hand each training micro-batch and its loss to ``sink``.

    The labels audited are the ones the model's forward received when exactly one training forward with
    labels ran inside the ``compute_loss`` call (what the model's own loss used, even if a custom
    ``compute_loss`` built or changed them); otherwise (labels popped before the forward for label smoothing
    or ``compute_loss_func``, DataParallel replicas, several forwards) the ones ``compute_loss`` received.
    The loss is always what ``compute_loss`` returned. :meth:`remove` restores the instance as it was.
    Evaluation calls (model in eval mode) pass through untouched.
    """

    def __init__(self, trainer: Any, sink: Sink) -> None:
        self._trainer = weakref.ref(trainer)
        self._sink = sink
        self._installed = False
        self._previous: Any = None
        self._had_attr = False
        self._wrapper: Callable[..., Any] | None = None
        self._hook: Any = None
        self._lock = threading.Lock()
        self._forwards: list[MicroBatch] | None = None  # forwards seen inside the current compute_loss call
        self.encoder_decoder = _is_encoder_decoder(getattr(trainer, "model", None))
        model = getattr(trainer, "model", None)
        self._orphans = ForwardCapture(model if isinstance(model, torch.nn.Module) else torch.nn.Module(), sink)

    def install(self) -> None:
        trainer = self._trainer()
        if trainer is None or self._installed:
            return
        original = trainer.compute_loss  # bound: the subclass's own override, or an instance attribute
        self._had_attr = "compute_loss" in trainer.__dict__
        self._previous = trainer.__dict__.get("compute_loss")
        capture = self

        def compute_loss(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if not (getattr(model, "training", False) and isinstance(inputs, Mapping)):
                return original(model, inputs, *args, **kwargs)
            given = read_batch(inputs, encoder_decoder=capture.encoder_decoder)
            with capture._lock:
                capture._forwards = []
            try:
                out = original(model, inputs, *args, **kwargs)
            finally:
                with capture._lock:
                    forwards, capture._forwards = capture._forwards or [], None
            labelled = [f for f in forwards if f.labels is not None or f.shift_labels is not None]
            mb = labelled[0] if len(labelled) == 1 else given
            if len(labelled) == 1:
                mb.unread = given.unread + [u for u in mb.unread if u not in given.unread]
            return_outputs = kwargs.get("return_outputs", args[0] if args else False)
            loss = out[0] if return_outputs and isinstance(out, tuple | list) else out
            if isinstance(model, torch.nn.DataParallel) and isinstance(loss, torch.Tensor) and loss.dim() == 1:
                loss = loss.mean()  # one loss per replica, gathered on one device: the Trainer trains the mean
            mb.loss = loss.detach() if isinstance(loss, torch.Tensor) else None
            mb.last = capture._is_last()
            capture._sink(mb)
            return out

        self._wrapper = compute_loss
        trainer.compute_loss = compute_loss
        model = getattr(trainer, "model", None)
        if isinstance(model, torch.nn.Module):
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._installed = True

    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not module.training:
            return
        with self._lock:
            inside = self._forwards is not None
        if not inside:
            # a training forward outside compute_loss (a custom training_step that calls the model itself):
            # audit it as the forward-hook fallback would, rather than not at all
            self._orphans._hook(module, args, kwargs, output)
            return
        mb = read_batch(_forward_inputs(args, kwargs), encoder_decoder=self.encoder_decoder)
        with self._lock:
            if self._forwards is not None:
                self._forwards.append(mb)

    def new_micro_batch(self) -> None:
        self._orphans.new_micro_batch()

    def _is_last(self) -> bool | None:
        trainer = self._trainer()
        accelerator = getattr(trainer, "accelerator", None)
        sync = getattr(accelerator, "sync_gradients", None)
        return None if sync is None else bool(sync)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        trainer = self._trainer()
        if trainer is None or not self._installed:
            return
        if trainer.__dict__.get("compute_loss") is self._wrapper:
            if self._had_attr:
                trainer.compute_loss = self._previous
            else:
                del trainer.__dict__["compute_loss"]
        self._installed = False


class ForwardCapture:
    """Fallback without a Trainer: a forward hook on the model (training forwards that carry labels).

    Thread-safe (``nn.DataParallel`` runs the hooks of its replicas in one thread per device): each call
    hands its own :class:`MicroBatch` to ``sink`` under a lock. A replica's call (the hooked module is a
    copy of the model) carries a chunk of the micro-batch's rows, on its own device: the chunks of one
    micro-batch (between two :meth:`new_micro_batch` calls) share ``part_of`` and count as one.
    """

    def __init__(self, model: torch.nn.Module, sink: Sink) -> None:
        self._model = model
        self._sink = sink
        self._handle: Any = None
        self._lock = threading.Lock()
        self.encoder_decoder = _is_encoder_decoder(model)
        self.without_labels = 0
        self._dedupe: tuple[int, tuple[int, ...]] | None = None
        self._generation = 0

    def install(self) -> None:
        if self._handle is None:
            self._handle = self._model.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def new_micro_batch(self) -> None:
        """The Trainer moved on to the next micro-batch: a forward of the same labels is a new one."""
        with self._lock:
            self._dedupe = None
            self._generation += 1

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not module.training:
            return
        mb = read_batch(_forward_inputs(args, kwargs), encoder_decoder=self.encoder_decoder)
        with self._lock:
            if mb.labels is None and mb.shift_labels is None:
                self.without_labels += 1
                return
            ref = mb.shift_labels if mb.labels is None else mb.labels
            key = (0, ()) if ref is None else (ref.data_ptr(), tuple(ref.shape))
            if key == self._dedupe:  # a second forward of the same micro-batch (e.g. TRL's metrics forward)
                return
            self._dedupe = key
            mb.loss = loss_of_output(output)
            if module is not self._model:  # a DataParallel replica: one row chunk of the micro-batch
                mb.part_of = self._generation
            self._sink(mb)
