"""MaskMonitorCallback: the transformers / TRL adapter over :class:`~mask_monitor.auditor.MaskAuditor`.

No Trainer event receives the batch or the loss, so the callback captures them where the Trainer computes
the loss (:mod:`mask_monitor.capture`): it wraps the Trainer's ``compute_loss`` and reads the batch the
Trainer hands it (labels included, even when label smoothing or a custom loss pops them before the model's
forward) and the loss it returns, for training micro-batches only, and hands them to the auditor, which
keeps everything on the device. The step is judged as soon as its last micro-batch's loss is known, before
that micro-batch's backward: one exchange across ranks, one read-back, the policy's verdict, the sinks; an
abort raises :class:`MaskMonitorAbort` there, so no engine applies the step (DeepSpeed steps inside
``backward``), and no checkpoint is written after it. Without a reachable Trainer the callback falls back
to a forward hook on the model and judges the step at ``on_pre_optimizer_step``.

At ``on_init_end`` it also reads what the trainer's dataset preparation removed: TRL drops examples whose
labels are all -100 before training starts (:mod:`mask_monitor.prepared`); a dataset where that is every
example stops at ``SFTTrainer(...)`` with ``all_masked`` instead of a sampler error in ``train()``.

Example:
    >>> from mask_monitor import MaskMonitorCallback
    >>> cb = MaskMonitorCallback(all_masked_micro_batch="abort", prompt_leakage="abort")
    >>> cb.config.all_masked_micro_batch, cb.config.zero_loss
    ('abort', 'abort')

Use: ``SFTTrainer(..., callbacks=[MaskMonitorCallback()])``.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ._version import __version__
from .auditor import MaskAuditor, fingerprint
from .capture import ForwardCapture, LossCapture, MicroBatch, find_trainer
from .checks import Finding
from .config import ConfigError, MonitorConfig
from .distributed import local_rank, rank_and_world
from .errors import MaskMonitorAbort, RankFailure
from .evidence import write_evidence
from .groups import trainer_groups
from .policy import Policy, first_abort
from .prepared import dropped_rows
from .reports import RunInfo, StepReport, Totals
from .sinks.base import Sink, SinkConfigError, SinkGroup
from .sinks.logging import LoggingSink
from .stats import UnsupportedBatch

__all__ = ["MaskMonitorCallback"]

logger = logging.getLogger("mask_monitor")


class MaskMonitorCallback(TrainerCallback, ExportableState):
    """Audit every training micro-batch; abort dead steps before the optimizer applies them.

    Args:
        config: a full :class:`MonitorConfig`; alternatively pass its fields as keyword arguments
            (``all_masked="abort"``, ``prompt_leakage_threshold=0.1``, ...). Unset values fall back to
            ``MASK_MONITOR_<FIELD>`` environment variables, then to the defaults.
        strict: shorthand for ``all_masked_micro_batch="abort"`` (abort on any all-masked micro-batch).
        sinks: extra :class:`~mask_monitor.sinks.Sink` objects to receive the reports, e.g.
            ``[PrometheusSink(port=9400)]`` (:mod:`mask_monitor.sinks.prometheus`).
        template: ``"auto"`` (detect from the trainer's tokenizer), a ``ChatTemplate``, or None (off).
        tokenizer: tokenizer used for template detection and for decoding evidence (defaults to the
            trainer's ``processing_class``).
        prometheus_port: deprecated, like every ``prometheus_*`` argument below (one FutureWarning naming
            the equivalent): pass ``sinks=[PrometheusSink(port=..., ...)]`` instead. Without a
            ``PrometheusSink`` in ``sinks``, ``MASK_MONITOR_PROMETHEUS_PORT`` / ``MASK_MONITOR_PUSHGATEWAY_URL``
            still turn an exporter on; with one, the environment only fills the settings it left unset.
        prometheus_addr: deprecated: ``PrometheusSink(addr=...)``.
        prometheus_certfile: deprecated: ``PrometheusSink(certfile=...)``.
        prometheus_keyfile: deprecated: ``PrometheusSink(keyfile=...)``.
        pushgateway_url: deprecated: ``PrometheusSink(pushgateway_url=...)``.
        prometheus_job: deprecated: ``PrometheusSink(job=...)``.
        prometheus_linger_seconds: deprecated: ``PrometheusSink(linger_seconds=...)``.
        prometheus_aggregate: deprecated: ``PrometheusSink(aggregate=...)``.
        wandb: whether the callback adds a :class:`~mask_monitor.sinks.wandb.WandbSink` by itself: ``None``
            (default) when a W&B run is active at train begin, ``True`` always (a missing or disabled wandb
            is one warning), ``False`` never. A ``WandbSink`` given in ``sinks`` is the one used (then
            nothing is added); to configure it, pass ``sinks=[WandbSink(table_max_rows=16)]``.
    """

    def __init__(
        self,
        *,
        config: MonitorConfig | None = None,
        strict: bool = False,
        sinks: Iterable[Sink] = (),
        template: Any = "auto",
        tokenizer: Any = None,
        prometheus_port: int | None = None,
        prometheus_addr: str | None = None,
        prometheus_certfile: str | None = None,
        prometheus_keyfile: str | None = None,
        pushgateway_url: str | None = None,
        prometheus_job: str | None = None,
        prometheus_linger_seconds: float | None = None,
        prometheus_aggregate: bool = False,
        wandb: bool | None = None,
        **checks: Any,
    ) -> None:
        given = dict(checks)
        if strict:
            explicit = {**(config.given() if config is not None else {}), **checks}.get("all_masked_micro_batch")
            if explicit not in (None, "abort"):
                raise ConfigError(f"strict=True asks all_masked_micro_batch='abort', but {explicit!r} was given")
            given["all_masked_micro_batch"] = "abort"
        self.config = MonitorConfig.resolve(given, base=config)
        self.policy = Policy(self.config)
        self.auditor = MaskAuditor(ignore_index=self.config.ignore_index, evidence_rows=self.config.evidence_rows)
        self._user_sinks: list[Sink] = list(sinks)
        self.sinks = SinkGroup([LoggingSink(), *self._user_sinks])
        self.template_setting = template
        self.template: Any = None  # the ChatTemplate in use (after train begin), or None
        self.tokenizer = tokenizer
        self._prom_settings = {
            "port": prometheus_port,
            "addr": prometheus_addr,
            "certfile": prometheus_certfile,
            "keyfile": prometheus_keyfile,
            "pushgateway_url": pushgateway_url,
            "job": prometheus_job,
            "linger_seconds": prometheus_linger_seconds,
            "aggregate": prometheus_aggregate,
        }
        if wandb is not None and not isinstance(wandb, bool):
            raise ConfigError(f"MaskMonitorCallback(wandb={wandb!r}): expected None (auto), True or False")
        if wandb is False and any(getattr(s, "name", None) == "wandb" for s in self._user_sinks):
            raise ConfigError("MaskMonitorCallback(wandb=False) contradicts the WandbSink given in sinks=[...]: "
                              "drop one of them")
        _deprecated_prometheus_arguments(self._prom_settings, self._user_sinks)
        self._wandb_setting = wandb
        self.info = RunInfo(version=__version__)
        self.findings: dict[str, int] = {}
        self.first_step: dict[str, int] = {}
        self.aborted: str | None = None
        self.evidence_path: str | None = None
        self.last_report: StepReport | None = None
        self._strict = strict
        self._capture: LossCapture | ForwardCapture | None = None
        self._trainer: Any = None  # weakref to the Trainer found at init / train begin
        self._audited_step = -1
        self._pending_step: int | None = None  # step whose micro-batches are pending (closed early or not)
        self._seen_unsynced = False
        self._active = False
        self._warned: set[str] = set()
        self._unread: dict[str, int] = {}  # field (and why) -> micro-batches audited without it
        self._noted: set[str] = set()  # run notes said once (prompt leakage not audited)
        self._dataset = Totals()  # what the dataset preparation dropped (added to each train()'s totals)
        self._dataset_details: dict[str, Any] = {}
        self._dropped_reasons: dict[str, int] = {}
        self._output_dir: str | None = None

    # ------------------------------------------------------------------ public
    def summary(self) -> dict[str, Any]:
        """Run totals so far over all ranks: counts, ratios, findings, abort reason, and what was not audited.

        ``not_audited`` says in words what the monitor could not see (empty when it saw everything):
        ``"masking"`` (micro-batches whose labels could not be read: only their loss was checked),
        ``"prompt_leakage"`` (no chat template, or its markers occur in none / not all of the sequences).
        """
        d = self.auditor.summary()
        d["aborted"] = self.aborted
        d["evidence_path"] = self.evidence_path
        d["findings"] = dict(self.findings)
        d["first_step"] = dict(self.first_step)
        d["template_family"] = getattr(self.template, "family", None)
        d["unread_fields"] = dict(self._unread)
        if self._dropped_reasons:
            d["dropped_reasons"] = dict(self._dropped_reasons)
        d["not_audited"] = self._not_audited(d)
        return d

    def _not_audited(self, d: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        n = int(d.get("unaudited_batches") or 0)
        if n:
            seen = n + int(d.get("micro_batches") or 0)
            out["masking"] = (f"{n} of {seen} micro-batches NOT audited: their labels could not be read "
                              "(only their loss was checked)")
        family = getattr(self.template, "family", None)
        untemplated = int(d.get("untemplated_sequences") or 0)
        if self.auditor.role_tagger is None:
            if int(d.get("micro_batches") or 0):
                why = ("turned off (template=None)" if self.template_setting is None else
                       "turned off (template_audit=False)" if not self.config.template_audit else
                       "no usable chat template for this tokenizer")
                out["prompt_leakage"] = f"not audited: {why}"
        elif untemplated and not d.get("audited_supervised_tokens"):
            out["prompt_leakage"] = (
                f"not audited: the {family} chat template's markers occur in none of the {untemplated} sequences "
                "(plain text or pre-packed ids, not a chat render)")
        elif untemplated:
            out["prompt_leakage"] = (
                f"not audited in {untemplated} of {int(d.get('sequences') or 0)} sequences: the {family} chat "
                "template's markers do not occur in them")
        return out

    def state(self) -> dict[str, Any]:
        """Saved by the Trainer in each checkpoint's ``trainer_state.json`` (``stateful_callbacks``).

        On ``resume_from_checkpoint`` the callback restores its run totals from there by itself at train
        begin. ``args`` carries the configuration the user gave (settings, ``strict``, a template named by
        family), so ``restore_callback_states_from_checkpoint=True``, which rebuilds the callback as
        ``MaskMonitorCallback(**args)``, rebuilds this monitor rather than a default one (sinks passed as
        objects are not serialisable: pass them again).
        """
        args: dict[str, Any] = dict(self.config.given())
        if self._strict:
            args["strict"] = True
        if self.template_setting is None or isinstance(self.template_setting, str):
            args["template"] = self.template_setting
        return {
            "args": args,
            "attributes": {
                "resume_state": {
                    "auditor": self.auditor.state_dict(),
                    "policy": self.policy.state_dict(),
                    "findings": dict(self.findings),
                    "first_step": dict(self.first_step),
                }
            },
        }

    def _restore(self, state: Any) -> None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        resume = ((saved or {}).get("attributes") or {}).get("resume_state")
        if not resume or state.global_step <= 0:
            return
        self.auditor.load_state_dict(resume["auditor"])
        if "policy" in resume:
            self.policy.load_state_dict(resume["policy"])
        self.findings = dict(resume.get("findings", {}))
        self.first_step = dict(resume.get("first_step", {}))
        logger.info("mask-monitor: resumed run totals at step %d", self.auditor.last_step)

    # ------------------------------------------------------------------ helpers
    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned:
            logger.debug(msg, *args)
            return
        self._warned.add(key)
        logger.warning(msg, *args)

    def _setup_template(self, tokenizer: Any) -> None:
        if not self.config.template_audit or self.template_setting is None:
            return
        from .templates import RoleTagger, describe, detect_template
        from .templates.spec import resolve_template

        try:
            spec = resolve_template(self.template_setting)  # auto, none, a family, a file or a ChatTemplate
            if spec == "auto":
                if tokenizer is None:
                    logger.info("mask-monitor: no tokenizer: leakage audit off, masked-fraction audit on")
                    return
                self.template = detect_template(tokenizer)
            else:
                self.template = spec
            if self.template is None:
                if self.info.is_main_process:
                    logger.info(
                        "mask-monitor: no chat template: leakage audit off, masked-fraction audit on "
                        "(register one with mask_monitor.register_template(...) and pass template=... to enable it)"
                    )
                return
            self.auditor.role_tagger = RoleTagger.from_tokenizer(tokenizer, self.template)
            if self.info.is_main_process:
                logger.info("mask-monitor: %s", describe(self.template))
        except Exception as exc:  # noqa: BLE001 - the template audit is optional
            self.auditor.role_tagger = None
            self._warn_once(
                "template", "mask-monitor: chat template audit disabled (%s: %s); masked-fraction audit on",
                type(exc).__name__, exc,
            )

    def _setup_sinks(self) -> None:
        # A PrometheusSink given in `sinks` is the exporter (it reads the environment for what it left unset);
        # otherwise the deprecated prometheus_* arguments and MASK_MONITOR_PROMETHEUS_* may ask for one.
        PrometheusSink: Any = None  # noqa: N806
        if not any(isinstance(s, Sink) and s.name == "prometheus" for s in self._user_sinks):
            try:
                from .sinks.prometheus import PrometheusSink
            except ImportError as exc:  # prometheus-client is an extra: mask-monitor[prometheus]
                PrometheusSink = None  # noqa: N806
                wanted = [f"{arg}={self._prom_settings[k]}" for k, arg in (("port", "prometheus_port"),
                          ("pushgateway_url", "pushgateway_url")) if self._prom_settings[k] is not None]
                wanted += [f"{k}={os.environ[k].strip()}" for k in ("MASK_MONITOR_PROMETHEUS_PORT",
                           "MASK_MONITOR_PUSHGATEWAY_URL") if os.environ.get(k, "").strip()]
                if wanted:
                    self._warn_once(
                        "prometheus", "mask-monitor: Prometheus export asked for (%s) but unavailable (%s); "
                        "pip install 'mask-monitor[prometheus]'. Training goes on without it.", ", ".join(wanted),
                        exc,
                    )
                else:
                    logger.debug("mask-monitor: Prometheus sink unavailable: %r", exc)
        if PrometheusSink is not None:
            try:
                sink = PrometheusSink.from_settings(**self._prom_settings)
            except ValueError as exc:  # a malformed setting (e.g. MASK_MONITOR_PROMETHEUS_PORT=abc): fail loudly
                raise SinkConfigError(f"mask-monitor: {exc}") from exc
            except Exception as exc:  # noqa: BLE001
                sink = None
                self._warn_once("prometheus", "mask-monitor: Prometheus export disabled: %s", exc)
            if sink is not None:
                self.sinks.add(sink)
        if self._wandb_setting is not False and not any(getattr(s, "name", None) == "wandb" for s in self._user_sinks):
            try:
                from .sinks.wandb import WandbSink

                sink = WandbSink.maybe_create(force=self._wandb_setting is True)
            except Exception as exc:  # noqa: BLE001 - wandb is optional
                sink = None
                logger.debug("mask-monitor: W&B sink unavailable: %r", exc)
            if sink is not None:
                self.sinks.add(sink)

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, **kwargs):
        """Read what the trainer's dataset preparation dropped; stop here when it dropped everything."""
        if not self.config.enabled:
            return
        trainer = find_trainer()
        if trainer is None:
            return
        self._trainer = weakref.ref(trainer)
        self._output_dir = getattr(args, "output_dir", None)
        # this trainer's dataset only (a callback passed to a second trainer forgets the first one's drops)
        self._dataset, self._dropped_reasons, self._dataset_details = Totals(), {}, {}
        try:
            info = dropped_rows(getattr(trainer, "train_dataset", None), max_length=getattr(args, "max_length", None),
                                ignore_index=self.config.ignore_index, keep=max(self.config.evidence_rows, 1))
        except Exception as exc:  # noqa: BLE001 - reading the prepared dataset is best effort
            logger.debug("mask-monitor: could not read the prepared dataset: %r", exc)
            info = None
        if info is None:
            return
        self._dataset = Totals(dropped_sequences=info.dropped)
        self._dropped_reasons = dict(info.reasons)
        self.auditor.reset()  # summary() tells the drop from now on (each train() starts from it again)
        self.auditor.add_totals(self._dataset)
        why = ", ".join(f"{v} {_DROP_REASONS.get(k, k)}" for k, v in info.reasons.items())
        self._dataset_details = {"reasons": why}
        if info.kept == 0:
            totals, only = Totals(dropped_sequences=info.dropped), ("all_masked",)
        else:
            totals, only = Totals(sequences=info.kept, dropped_sequences=info.dropped), ("dropped_sequences",)
        findings = self.policy.evaluate(totals, scope="dataset", only=only, details=self._dataset_details)
        rank, _ = rank_and_world()
        for f in findings:
            if f.action == "warn" and rank == 0:
                logger.warning("%s", f.message)
        abort = first_abort(findings)
        if abort is not None:
            self._abort_before_training(abort, info, rank)

    def _abort_before_training(self, finding: Finding, info: Any, rank: int) -> None:
        """All training data was dropped as fully masked: stop while the trainer is being built."""
        self.aborted = finding.check
        report = StepReport(step=0, rank=rank, world_size=1, total=self._dataset, per_rank=(self._dataset,),
                            micro_batches=())
        self.evidence_path = write_evidence(
            output_dir=self._output_dir, reason=finding.check, step=0, rank=rank, numbers=finding.numbers,
            report=report, rows=[{k: [r[k] for r in info.rows] for k in info.rows[0]}] if info.rows else [],
            tokenizer=self.tokenizer, ignore_index=self.config.ignore_index, message=finding.message,
        )
        error = MaskMonitorAbort(finding.check, step=0, rank=rank, numbers=finding.numbers,
                                 evidence_path=self.evidence_path, message=finding.message)
        logger.error("rank %d: %s", rank, error)
        raise error

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.config.enabled:
            return
        rank, world = rank_and_world()
        self._output_dir = getattr(args, "output_dir", None)
        self.info = RunInfo(
            run_name=str(getattr(args, "run_name", "") or ""),
            output_dir=self._output_dir,
            rank=rank,
            local_rank=local_rank(),
            world_size=world,
            is_main_process=bool(getattr(state, "is_world_process_zero", rank == 0)),
            version=__version__,
        )
        self._new_run()
        max_length = getattr(args, "max_length", None)  # SFTConfig's truncation length
        self.auditor.max_length = max_length if isinstance(max_length, int) and max_length > 0 else None
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
        self.tokenizer = tokenizer
        self._setup_template(tokenizer)
        self.info.template_family = getattr(self.template, "family", None)
        self.sinks = SinkGroup([LoggingSink(), *self._user_sinks])  # fresh per train(): no duplicates
        self._setup_sinks()
        self.info.decoded_text = self.config.decoded_text  # where sinks may send decoded training text
        for sink in self.sinks.sinks:
            if getattr(sink, "tokenizer", None) is None:
                sink.tokenizer = tokenizer
            if sink.wants_batches:
                sink.ignore_index = self.config.ignore_index
                sink.role_tagger = self.auditor.role_tagger
        self.sinks.call("on_train_begin", self.info)  # SinkConfigError (e.g. port taken) propagates
        self._restore(state)
        self._remove_capture()
        trainer = find_trainer() or (self._trainer() if self._trainer is not None else None)
        if trainer is not None:
            self._trainer = weakref.ref(trainer)
            self._capture = LossCapture(trainer, self._on_micro_batch)
        elif model is not None:
            self._capture = ForwardCapture(model, self._on_micro_batch)
            logger.debug("mask-monitor: no Trainer found; auditing through a forward hook on the model")
        else:
            self._warn_once("model", "mask-monitor: neither a Trainer nor a model reached on_train_begin; audit off")
            return
        self._capture.install()
        self._setup_groups(trainer)
        self._active = True
        self._audited_step = state.global_step

    def _setup_groups(self, trainer: Any) -> None:
        """Exchange over the data-parallel group only, shards of a sequence combined (TP / CP / SP), and let
        every rank check that the others judge with the same settings."""
        self.auditor.set_groups(None, None)
        # the verdict is a function of the exchanged counts and the settings: equal settings, equal verdicts
        self.auditor.fingerprint = fingerprint(sorted(self.config.as_dict().items()))
        if trainer is None:
            return
        try:
            dp, seq, described = trainer_groups(trainer)
        except Exception as exc:  # noqa: BLE001 - the monitor's own fault: one warning, counts over the world
            self._warn_once("groups", "mask-monitor: cannot read the data-parallel / sequence groups (%s: %s); "
                            "counting over every rank (tensor-parallel ranks counted more than once)",
                            type(exc).__name__, exc)
            return
        if described:
            self.auditor.set_groups(dp, seq)
            if self.info.is_main_process:
                logger.info("mask-monitor: %s: counting over the data-parallel group%s", described,
                            ", sequence shards combined" if seq is not None else "")

    def _new_run(self) -> None:
        """Each train() reports its own run (resuming from a checkpoint restores the saved totals after this)."""
        self.auditor.reset()
        self.policy.reset()
        self.auditor.add_totals(self._dataset)
        self.findings, self.first_step = {}, {}
        self.aborted, self.evidence_path, self.last_report = None, None, None
        self._unread = {}
        self._noted = set()
        self._pending_step, self._seen_unsynced = None, False

    def on_step_begin(self, args, state, control, **kwargs):
        if self._capture is not None:
            self._capture.new_micro_batch()

    def on_substep_end(self, args, state, control, **kwargs):
        if self._capture is not None:
            self._capture.new_micro_batch()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._close_step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        # Fallback for trainers that skip on_pre_optimizer_step: audit late rather than never.
        if self._active and self._audited_step < state.global_step:
            self._close_step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._active:
            return
        window = self.auditor.window()
        if window is None:
            return
        self.sinks.call("on_log", window)
        if any(s.wants_batches for s in self.sinks.sinks) and self.last_report is not None:
            try:
                rows = self.auditor.evidence_rows_of_last_step()  # one read-back per logging step
            except Exception as exc:  # noqa: BLE001
                self._warn_once("rows", "mask-monitor: could not read batch rows for sinks: %s", exc)
                return
            # the run's own group: its warn-once guard holds across logging steps (other sinks no-op)
            self.sinks.call("on_micro_batch_rows", self.last_report, rows)

    def on_train_end(self, args, state, control, **kwargs):
        if not self._active:
            return
        self._finish()

    # ------------------------------------------------------------------ capture (hot path)
    def _on_micro_batch(self, mb: MicroBatch) -> None:
        """One training micro-batch: audit what can be read; judge the step at its last micro-batch."""
        if not self._active:
            return
        for note in mb.unread:
            self._unread[note] = self._unread.get(note, 0) + 1
            self._warn_once(f"unread:{note.split(':')[0]}",
                            "mask-monitor: cannot read %s; audited without it, from the labels (what it marks, e.g. "
                            "padding, is not excluded from the counts; training goes on)", note)
        labels = mb.labels if mb.labels is not None else mb.shift_labels
        if labels is None:
            self._warn_once("labels", "mask-monitor: a training micro-batch reached the loss without labels the "
                            "audit can read; its masking is NOT audited, only its loss (summary()"
                            "['unaudited_batches'])")
        try:
            self.auditor.update(labels, input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                position_ids=mb.position_ids, shift_labels=mb.shift_labels, loss=mb.loss,
                                causal=mb.causal, part_of=mb.part_of)
        except Exception as exc:  # noqa: BLE001 - the monitor must not break a healthy run
            what = "cannot interpret" if isinstance(exc, UnsupportedBatch) else "failed to audit"
            self._warn_once("batch", "mask-monitor: %s a batch's labels (%s: %s); only its loss is checked, "
                            "training goes on", what, type(exc).__name__, exc)
            try:
                self.auditor.update(None, loss=mb.loss, part_of=mb.part_of)
            except Exception as exc2:  # noqa: BLE001
                self._warn_once("loss", "mask-monitor: cannot read a batch's loss either (%r)", exc2)
        if mb.last is False:
            self._seen_unsynced = True
        trainer = self._trainer() if self._trainer is not None else None
        if mb.last and trainer is not None and (self._seen_unsynced or _accumulation(trainer) == 1):
            # the step's last micro-batch: judge it before its backward (DeepSpeed steps inside backward)
            self._close_step(int(trainer.state.global_step) + 1)

    def _remove_capture(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    # ------------------------------------------------------------------ step close, verdict, action
    def _close_step(self, step: int) -> None:
        if not self._active or self._audited_step >= step:
            return
        self._audited_step = step
        try:
            report = self.auditor.step(step)
        except RankFailure as exc:  # a rank could not close the step: every rank raises here, in this step
            logger.error("rank %d: %s", self.info.rank, exc)
            self._finish()
            raise
        except Exception as exc:
            if self.auditor.exchanges:  # a collective failed: the ranks can no longer stay in step; stop loudly
                logger.error("rank %d: mask-monitor: the step exchange failed (%s: %s)", self.info.rank,
                             type(exc).__name__, exc)
                self._finish()
                raise
            self._warn_once("step", "mask-monitor: step audit failed (%s: %s); training goes on",
                            type(exc).__name__, exc)
            return
        self.last_report = report
        self._note_leakage_audit(report)
        findings = self.policy.evaluate(report)
        for f in findings:
            self.findings[f.check] = self.findings.get(f.check, 0) + 1
            self.first_step.setdefault(f.check, f.step)
        self.sinks.call("on_step", report, findings)
        abort = first_abort(findings)
        if abort is not None:
            self._abort(abort, report)

    def _note_leakage_audit(self, report: StepReport) -> None:
        """Say once per run when the template's markers are missing from what is trained on (plain text,
        pre-packed ids): those sequences are not audited for prompt leakage, never read as 100% prompt."""
        t = report.total
        if self.auditor.role_tagger is None or t.untemplated_sequences <= 0 or "leakage" in self._noted:
            return
        self._noted.add("leakage")
        if not self.info.is_main_process:
            return
        family = getattr(self.template, "family", None)
        if t.audited_supervised_tokens <= 0:
            logger.info("mask-monitor: prompt leakage NOT audited: the %s chat template's markers occur in none of "
                        "the %d sequences of step %d (plain text or pre-packed ids, not a chat render); the "
                        "masking audit is on", family, t.untemplated_sequences, report.step)
        else:
            logger.info("mask-monitor: %d of %d sequences in step %d carry none of the %s chat template's markers; "
                        "they are not audited for prompt leakage", t.untemplated_sequences, t.sequences,
                        report.step, family)

    def _abort(self, finding: Finding, report: StepReport) -> None:
        rank = self.info.rank
        self.aborted = finding.check
        self.evidence_path = write_evidence(
            output_dir=self._output_dir,
            reason=finding.check,
            step=finding.step,
            rank=rank,
            numbers=finding.numbers,
            report=report,
            rows=self.auditor.evidence_rows_of_last_step(),
            tokenizer=self.tokenizer,
            ignore_index=self.config.ignore_index,
            message=finding.message,
            decoded_text=self.config.decoded_text,
        )
        error = MaskMonitorAbort(
            finding.check,
            step=finding.step,
            rank=rank,
            numbers=finding.numbers,
            evidence_path=self.evidence_path,
            message=finding.message,
        )
        self.sinks.call("on_abort", error, report)
        self._finish()
        raise error

    def _finish(self) -> None:
        self._active = False
        self._remove_capture()
        self.sinks.call("on_train_end", self.summary())
        self.sinks.call("close")


_DROP_REASONS = {
    "no_response": "with no supervised label at all",
    "truncated_away": "whose supervised labels max_length cut off",
}


_PROMETHEUS_ARGUMENTS = {
    "port": "prometheus_port",
    "addr": "prometheus_addr",
    "certfile": "prometheus_certfile",
    "keyfile": "prometheus_keyfile",
    "pushgateway_url": "pushgateway_url",
    "job": "prometheus_job",
    "linger_seconds": "prometheus_linger_seconds",
    "aggregate": "prometheus_aggregate",
}


def _deprecated_prometheus_arguments(settings: Mapping[str, Any], sinks: list[Sink]) -> None:
    """One FutureWarning naming the equivalent ``PrometheusSink(...)`` for the flat ``prometheus_*`` arguments;
    a ValueError when a ``PrometheusSink`` is given as well (two exporters, or one configured twice)."""
    given = {k: v for k, v in settings.items() if v is not None and v is not False}
    if not given:
        return
    flat = ", ".join(f"{_PROMETHEUS_ARGUMENTS[k]}={v!r}" for k, v in given.items())
    sink = "PrometheusSink(" + ", ".join(f"{k}={v!r}" for k, v in given.items()) + ")"
    if any(isinstance(s, Sink) and s.name == "prometheus" for s in sinks):
        raise ConfigError(
            f"MaskMonitorCallback({flat}) configures a Prometheus exporter, and sinks= holds a PrometheusSink "
            f"already: move these settings into it, {sink}"
        )
    warnings.warn(
        f"MaskMonitorCallback({flat}) is deprecated: pass the exporter as a sink, "
        f"MaskMonitorCallback(sinks=[{sink}]) (from mask_monitor.sinks.prometheus import PrometheusSink)",
        FutureWarning,
        stacklevel=3,
    )


def _accumulation(trainer: Any) -> int:
    return int(getattr(getattr(trainer, "args", None), "gradient_accumulation_steps", 1) or 1)
