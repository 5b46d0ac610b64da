"""``mask-monitor audit``: pre-flight audit of a dataset with TRL's own preparation, on the CPU.

The verdict is the training callback's: the same checks, the same :class:`~mask_monitor.config.MonitorConfig`
(``--set CHECK=abort|warn|off``, ``--set THRESHOLD=VALUE``, ``MASK_MONITOR_*`` variables). Exit codes: 0
healthy, 1 a finding whose action is ``abort`` (with ``--fail-on warn``: any finding), 2 a usage or input
error (one line on stderr).

Example::

    mask-monitor audit --tokenizer TinyLlama/TinyLlama-1.1B-Chat-v1.0 --data train.jsonl \\
        --config sft.yaml --max-length 2048 --show 4 --html audit.html
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from ._errors import EXIT_OK, UsageError

__all__ = ["register", "run", "build_options"]

_UNSET: Any = object()  # "option not given" (argparse converts string defaults, not objects)

_THRESHOLDS = {
    "fully_masked_threshold": "fully_masked_share_threshold",
    "prompt_leakage_threshold": "prompt_leakage_threshold",
    "response_coverage_threshold": "response_coverage_threshold",
}


def _max_length(value: str) -> int | None:
    if value.lower() in ("none", "null", "0"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def _tristate(value: str) -> bool | None:
    v = value.lower()
    if v in ("auto", "none"):
        return None
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto/true/false, got {value!r}")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "audit",
        help="audit a dataset's label masking before training (TRL's own preparation, CPU only)",
        description=(
            "Prepare the dataset exactly as trl.SFTTrainer would for the given settings (no model weights, "
            "no GPU), collate it with TRL's collator and report what the loss will see. Exit 0 healthy, "
            "1 blocking finding, 2 usage or input error."
        ),
    )
    src = p.add_argument_group("inputs")
    src.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name")
    src.add_argument("--data", required=True,
                     help="JSONL/JSON/Parquet/CSV file, a datasets save_to_disk folder, or a hub dataset name")
    src.add_argument("--split", default="train", help="split of a folder / hub dataset (default: train)")
    src.add_argument("--config", help="SFTConfig file (YAML or JSON); options below override it")
    trl = p.add_argument_group("trainer settings that change labels (SFTConfig fields)")
    trl.add_argument("--assistant-only-loss", action=argparse.BooleanOptionalAction, default=None)
    trl.add_argument("--completion-only-loss", type=_tristate, default=_UNSET, metavar="{auto,true,false}")
    trl.add_argument("--max-length", type=_max_length, default=_UNSET, metavar="N|none")
    trl.add_argument("--truncation-mode", choices=["keep_start", "keep_end"])
    trl.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None)
    trl.add_argument("--packing-strategy", choices=["bfd", "bfd_split", "wrapped"])
    trl.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=None)
    trl.add_argument("--dataset-text-field")
    big = p.add_argument_group("large datasets")
    big.add_argument("--sample", type=int, help="audit a uniform random sample of N examples")
    big.add_argument("--seed", type=int, default=0, help="seed of --sample (default: 0)")
    big.add_argument("--num-proc", type=int, help="processes for TRL's dataset preparation")
    big.add_argument("--streaming", action="store_true", help="read and prepare lazily (bounded memory, no disk)")
    big.add_argument("--batch-size", type=int, default=256, help="rows per collated batch (default: 256)")
    big.add_argument("--no-progress", action="store_true", help="no progress bars")
    chk = p.add_argument_group("verdict (the training callback's checks and MonitorConfig)")
    chk.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="a MonitorConfig setting, e.g. prompt_leakage=abort or prompt_leakage_threshold=0.1 "
                     "(repeatable; overrides MASK_MONITOR_* variables)")
    chk.add_argument("--fail-on", choices=["abort", "warn"], default="abort",
                     help="exit 1 on findings whose action is abort (default), or on any finding")
    chk.add_argument("--fully-masked-threshold", type=float,
                     help="same as --set fully_masked_share_threshold=X")
    chk.add_argument("--prompt-leakage-threshold", type=float, help="same as --set prompt_leakage_threshold=X")
    chk.add_argument("--response-coverage-threshold", type=float,
                     help="same as --set response_coverage_threshold=X")
    chk.add_argument("--allow-prompt-training", action="store_true",
                     help="deprecated: same as --set prompt_leakage=warn (the default)")
    chk.add_argument("--template", default="auto", metavar="auto|none|FAMILY|FILE",
                     help="chat-template audit (prompt leakage, coverage, end of turn): auto (detect), none, a "
                     "registered family name, or a JSON/YAML file of ChatTemplate fields (as template= of the "
                     "callback)")
    out = p.add_argument_group("output")
    out.add_argument("--show", type=int, default=0, metavar="N", help="print N examples with coloured tokens")
    out.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    out.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.set_defaults(func=run)


def build_options(args: argparse.Namespace) -> Any:
    """The :class:`~mask_monitor.audit.AuditOptions` of parsed arguments (config file, then options)."""
    from ..audit.pipeline import AuditOptions
    from ..audit.prepare import read_config_file
    from ..config import MonitorConfig

    sft: dict[str, Any] = read_config_file(args.config) if args.config else {}
    if args.assistant_only_loss is not None:
        sft["assistant_only_loss"] = args.assistant_only_loss
    if args.completion_only_loss is not _UNSET:
        sft["completion_only_loss"] = args.completion_only_loss
    if args.max_length is not _UNSET:
        sft["max_length"] = args.max_length
    for name in ("truncation_mode", "packing", "packing_strategy", "padding_free", "dataset_text_field"):
        v = getattr(args, name)
        if v is not None:
            sft[name] = v
    for name, value in (("--sample", args.sample), ("--num-proc", args.num_proc), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if args.show < 0:
        raise UsageError(f"--show must be >= 0, got {args.show}")
    from ..templates import TemplateSpecError, resolve_template

    try:
        resolve_template(args.template)
    except TemplateSpecError as exc:
        raise UsageError(f"--template: {exc}") from None
    given: dict[str, Any] = {field: getattr(args, opt) for opt, field in _THRESHOLDS.items()}
    if args.allow_prompt_training:
        print("mask-monitor: --allow-prompt-training is deprecated: prompt leakage is a warning unless "
              "prompt_leakage=abort", file=sys.stderr)
        given["prompt_leakage"] = "warn"
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected NAME=VALUE")
        given[name.strip()] = value
    try:
        monitor = MonitorConfig.resolve(given)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return AuditOptions(
        tokenizer=args.tokenizer,
        data=args.data,
        split=args.split,
        sft=sft,
        sample=args.sample,
        seed=args.seed,
        num_proc=args.num_proc,
        streaming=args.streaming,
        batch_size=args.batch_size,
        template=args.template,
        show=args.show,
        keep_worst=max(10, args.show),
        monitor=monitor,
        fail_on=args.fail_on,
    )


def _audit(options: Any, err: Any, show_progress: bool, datasets: Any, run_audit: Any) -> Any:
    if not show_progress:
        datasets.disable_progress_bars()
        return run_audit(options)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("auditing batches"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("audit", total=None)

        def progress(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        return run_audit(options, progress=progress)


def run(args: argparse.Namespace) -> int:
    options = build_options(args)
    import datasets
    from rich.console import Console

    from ..audit.pipeline import run_audit
    from ..audit.report import render_html, render_json, render_terminal

    err = Console(stderr=True)
    # libraries print to stdout now and then (transformers' W&B notice); keep stdout for the report
    with contextlib.redirect_stdout(sys.stderr):
        result = _audit(options, err, not args.no_progress and err.is_terminal, datasets, run_audit)
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as fh:
                fh.write(render_html(result, show=max(args.show, 10)))
        except OSError as exc:
            raise UsageError(f"cannot write {args.html}: {exc.strerror or exc}") from None
    if args.json:
        render_json(result, sys.stdout)
    else:
        render_terminal(result, Console(), show=args.show)
        if args.html:
            Console().print(f"HTML report: {args.html}")
    return result.exit_code if result.exit_code else EXIT_OK
