"""MaskMonitorCallback: the transformers / TRL adapter over :class:`~mask_monitor.auditor.MaskAuditor`.

No Trainer event receives the batch or the loss, so the callback puts one forward hook on the model
given to ``on_train_begin``. The hook reads ``labels`` (and ``input_ids``, ``attention_mask``,
``position_ids``, ``shift_labels``) from the forward's keyword arguments and ``loss`` from its output,
for training forwards only, and hands them to the auditor, which keeps everything on the device.
``on_pre_optimizer_step`` closes the step: one exchange across ranks, one read-back, the policy's
verdict, the sinks; an abort raises :class:`MaskMonitorAbort` there, before ``optimizer.step()``,
so the offending update is never applied and no checkpoint is written after it.

Example:
    >>> from mask_monitor import MaskMonitorCallback
    >>> cb = MaskMonitorCallback(all_masked_micro_batch="abort", prompt_leakage="abort")
    >>> cb.config.all_masked_micro_batch, cb.config.zero_loss
    ('abort', 'abort')

Use: ``SFTTrainer(..., callbacks=[MaskMonitorCallback()])``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ._version import __version__
from .auditor import MaskAuditor
from .checks import Finding
from .config import ConfigError, MonitorConfig
from .distributed import local_rank, rank_and_world
from .errors import MaskMonitorAbort
from .evidence import write_evidence
from .policy import Policy, first_abort
from .reports import RunInfo, StepReport
from .sinks.base import Sink, SinkConfigError, SinkGroup
from .sinks.logging import LoggingSink
from .stats import UnsupportedBatch

__all__ = ["MaskMonitorCallback"]

logger = logging.getLogger("mask_monitor")

_BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "shift_labels")


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
        prometheus_port, prometheus_addr, prometheus_certfile, prometheus_keyfile, pushgateway_url,
        prometheus_job, prometheus_linger_seconds, prometheus_aggregate: deprecated (one FutureWarning
            naming the equivalent): pass ``sinks=[PrometheusSink(port=..., addr=..., ...)]`` instead. Without
            a ``PrometheusSink`` in ``sinks``, ``MASK_MONITOR_PROMETHEUS_PORT`` /
            ``MASK_MONITOR_PUSHGATEWAY_URL`` still turn an exporter on; with one, the environment only fills
            the settings that sink left unset.
        wandb: log to Weights & Biases when a run is active (None = auto, False = never).
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
        self.template = None
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
        _deprecated_prometheus_arguments(self._prom_settings, self._user_sinks)
        self._wandb_setting = wandb
        self.info = RunInfo(version=__version__)
        self.findings: dict[str, int] = {}
        self.first_step: dict[str, int] = {}
        self.aborted: str | None = None
        self.evidence_path: str | None = None
        self.last_report: StepReport | None = None
        self._hooks: list[Any] = []
        self._dedupe_key: tuple | None = None
        self._audited_step = -1
        self._active = False
        self._warned: set[str] = set()
        self._forwards_without_labels = 0
        self._output_dir: str | None = None

    # ------------------------------------------------------------------ public
    def summary(self) -> dict[str, Any]:
        """Run totals so far over all ranks: counts, ratios, findings, abort reason."""
        d = self.auditor.summary()
        d["aborted"] = self.aborted
        d["evidence_path"] = self.evidence_path
        d["findings"] = dict(self.findings)
        d["first_step"] = dict(self.first_step)
        d["template_family"] = getattr(self.template, "family", None)
        return d

    def state(self) -> dict[str, Any]:
        """Saved by the Trainer in each checkpoint's ``trainer_state.json`` (``stateful_callbacks``).

        On ``resume_from_checkpoint`` the callback restores its run totals from there by itself at train
        begin. (With ``restore_callback_states_from_checkpoint=True`` transformers instead replaces the
        callback object by a new default-configured one; leave that option off.)
        """
        return {
            "args": {},
            "attributes": {
                "resume_state": {
                    "auditor": self.auditor.state_dict(),
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
        try:
            from .templates import RoleTagger, describe, detect_template
        except ImportError:  # pragma: no cover - the templates package ships with the project
            return
        try:
            if self.template_setting == "auto":
                if tokenizer is None:
                    logger.info("mask-monitor: no tokenizer: leakage audit off, masked-fraction audit on")
                    return
                self.template = detect_template(tokenizer)
            else:
                self.template = self.template_setting
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
        PrometheusSink = None  # noqa: N806
        if not any(isinstance(s, Sink) and s.name == "prometheus" for s in self._user_sinks):
            try:
                from .sinks.prometheus import PrometheusSink
            except ImportError:
                PrometheusSink = None  # noqa: N806
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
        if self._wandb_setting is not False:
            try:
                from .sinks.wandb import WandbSink

                sink = WandbSink.maybe_create(force=self._wandb_setting is True)
            except Exception as exc:  # noqa: BLE001 - wandb is optional
                sink = None
                logger.debug("mask-monitor: W&B sink unavailable: %r", exc)
            if sink is not None:
                self.sinks.add(sink)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ the forward hook (hot path)
    def _forward_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._active or not module.training:
            return
        labels = kwargs.get("labels")
        if labels is None:
            self._forwards_without_labels += 1
            return
        try:
            if not isinstance(labels, torch.Tensor):
                raise UnsupportedBatch(f"labels is a {type(labels).__name__}")
            key = (labels.data_ptr(), tuple(labels.shape))
            if key == self._dedupe_key:  # a second forward of the same micro-batch
                return
            self._dedupe_key = key
            batch = {k: kwargs.get(k) for k in _BATCH_KEYS}
            if batch["input_ids"] is None and args and isinstance(args[0], torch.Tensor):
                batch["input_ids"] = args[0]
            batch = {k: (v if isinstance(v, torch.Tensor) else None) for k, v in batch.items()}
            self.auditor.update(labels, loss=_loss_of(output), **batch)
        except UnsupportedBatch as exc:
            self._warn_once("shape", "mask-monitor: skipping a batch it cannot interpret (%s); training goes on", exc)
        except Exception as exc:  # noqa: BLE001 - the monitor must not break a healthy run
            self._warn_once(
                "hook", "mask-monitor: audit of a batch failed (%s: %s); skipped, training goes on",
                type(exc).__name__, exc,
            )

    # ------------------------------------------------------------------ Trainer events
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
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
        self.tokenizer = tokenizer
        self._setup_template(tokenizer)
        self.info.template_family = getattr(self.template, "family", None)
        self.sinks = SinkGroup([LoggingSink(), *self._user_sinks])  # fresh per train(): no duplicates
        self._setup_sinks()
        for sink in self.sinks.sinks:
            if getattr(sink, "tokenizer", None) is None:
                sink.tokenizer = tokenizer
            if sink.wants_batches:
                sink.ignore_index = self.config.ignore_index
        self.sinks.call("on_train_begin", self.info)  # SinkConfigError (e.g. port taken) propagates
        self._restore(state)
        self._remove_hooks()
        if model is None:
            self._warn_once("model", "mask-monitor: no model given to on_train_begin; audit off")
            return
        self._hooks.append(model.register_forward_hook(self._forward_hook, with_kwargs=True))
        self._active = True
        self._audited_step = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        self._dedupe_key = None

    def on_substep_end(self, args, state, control, **kwargs):
        self._dedupe_key = None

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

    # ------------------------------------------------------------------ step close, verdict, action
    def _close_step(self, step: int) -> None:
        if not self._active:
            return
        self._audited_step = step
        try:
            report = self.auditor.step(step)
        except Exception as exc:  # noqa: BLE001 - e.g. a collective that failed; never stop a healthy run
            self._warn_once("step", "mask-monitor: step audit failed (%s: %s); training goes on",
                            type(exc).__name__, exc)
            return
        self.last_report = report
        if report.total.micro_batches == 0 and self._forwards_without_labels:
            self._warn_once(
                "labels",
                "mask-monitor: %d training forward(s) in step %d received no labels (label smoothing or a custom "
                "compute_loss pops them before the model's forward): the audit cannot see these batches",
                self._forwards_without_labels, step,
            )
        self._forwards_without_labels = 0
        findings = self.policy.evaluate(report)
        for f in findings:
            self.findings[f.check] = self.findings.get(f.check, 0) + 1
            self.first_step.setdefault(f.check, f.step)
        self.sinks.call("on_step", report, findings)
        abort = first_abort(findings)
        if abort is not None:
            self._abort(abort, report)

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
        self._remove_hooks()
        self.sinks.call("on_train_end", self.summary())
        self.sinks.call("close")


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


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() >= 1:
        return loss.detach()
    return None

