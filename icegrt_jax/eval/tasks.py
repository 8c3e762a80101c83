"""The paper's benchmark settings as lm-eval tasks (configs/eval/), and local data files.

Each ``configs/eval/icegrt_*.yaml`` is an lm-eval group (or task) that fixes one benchmark's
Table 1 setting: which stock lm-eval tasks, how many shots, which metric is the headline
(its ``aggregate_metric_list[0]``, or ``metric_list[0]`` for a task), and in ``metadata`` the
scoring mode and the ``lm_eval/tasks`` sub-directories it needs. Only those directories are
indexed, which keeps lm-eval's task index (seconds per thousand YAML files) small. The same
files work with lm-eval's own CLI: ``--include_path configs/eval --tasks icegrt_mmlu``.

Local data (``data_dir``): every leaf task gets an override YAML that includes its original
config and reads JSONL files in the upstream dataset's schema instead of the hub::

    DATA_DIR/<dataset_path>/<dataset_name>/<split>.jsonl      (no <dataset_name> level if null)

e.g. ``DATA_DIR/allenai/ai2_arc/ARC-Easy/test.jsonl``. The evaluated split (test, else
validation) and the split the shots come from (unless the shots are written in the config)
must exist; other splits the config names are used when present and dropped otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from icegrt_jax import files
from icegrt_jax.data.sources import jsonl_records
from icegrt_jax.errors import UserInputError
from icegrt_jax.eval import MissingExtraError, require_lm_eval

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"  # package data
NAME_PREFIX = "icegrt_"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
OTHER_TASKS_HINT = "any other lm-eval task runs with `python -m icegrt_jax.eval.lm_eval_backend`"


class UnknownTaskError(UserInputError):
    """A task name that is not one of the paper's settings (or not in lm-eval)."""


class HubDataError(UserInputError):
    """The benchmark data cannot be downloaded from the HF hub (no network)."""


class LocalDataError(UserInputError):
    """Missing or unusable local data files."""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One config of configs/eval: a benchmark (``metric`` set) or a collection (``members`` set)."""

    name: str  # lm-eval group/task name, e.g. "icegrt_mmlu"
    column: str | None  # the paper's column title, e.g. "MMLU 5-shot"
    metric: str | None  # key of the headline metric in lm-eval's results, e.g. "acc,none"
    scoring: str | None  # "loglikelihood" | "generate"
    lm_eval_dirs: tuple[str, ...]  # stock lm_eval/tasks sub-directories it needs
    members: tuple[str, ...]  # the benchmarks a collection groups


def _headline_metric(cfg: dict) -> str | None:
    """``metric,filter`` of the first aggregate (group) or metric (task) entry, if any."""
    entries = cfg.get("aggregate_metric_list") if "group" in cfg else cfg.get("metric_list")
    if not entries:
        return None
    filters = entries[0].get("filter_list") or ["none"]
    return f"{entries[0]['metric']},{filters if isinstance(filters, str) else filters[0]}"


def benchmark_from_config(cfg: dict, config_names: Iterable[str]) -> Benchmark:
    """The ``Benchmark`` of one parsed config (``config_names``: all names in configs/eval)."""
    is_group = "group" in cfg
    children = cfg["task"] if is_group else []
    metadata = cfg.get("metadata") or {}
    config_names = set(config_names)
    return Benchmark(
        name=cfg["group"] if is_group else cfg["task"],
        column=cfg.get("group_alias" if is_group else "task_alias"),
        metric=_headline_metric(cfg),
        scoring=metadata.get("scoring"),
        lm_eval_dirs=tuple(metadata.get("lm_eval_dirs") or ()),
        members=tuple(c for c in children if isinstance(c, str) and c in config_names),
    )


def load_benchmarks(config_dir: str | Path = CONFIG_DIR) -> dict[str, Benchmark]:
    """name -> ``Benchmark`` for every config in ``config_dir``, in file-name order."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    index = TaskManager(include_defaults=False, include_path=str(config_dir)).task_index
    configs = {name: entry.cfg for name, entry in index.items() if entry.cfg is not None}
    if not configs:
        raise UnknownTaskError(f"{config_dir}: no benchmark configs (expected configs/eval/*.yaml)")
    return {name: benchmark_from_config(cfg, configs) for name, cfg in configs.items()}


def resolve_names(names: Sequence[str], benchmarks: dict[str, Benchmark]) -> list[str]:
    """Benchmark names for the requested ones: the ``icegrt_`` prefix is optional and a collection
    (``table1``, ``ablation``) stands for its members; duplicates are dropped, order kept."""
    resolved: list[str] = []
    for raw in names:
        name = raw.strip()
        full = name if name in benchmarks else NAME_PREFIX + name
        if full not in benchmarks:
            known = ", ".join(n.removeprefix(NAME_PREFIX) for n in benchmarks)
            raise UnknownTaskError(f"unknown task {name!r}; the paper's settings are: {known} "
                                   f"(configs/eval/); {OTHER_TASKS_HINT}")
        expanded = resolve_names(benchmarks[full].members, benchmarks) if benchmarks[full].members else [full]
        resolved += [n for n in expanded if n not in resolved]
    return resolved


def lm_eval_tasks_dir() -> Path:
    require_lm_eval()
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def stock_dirs(names: Sequence[str], benchmarks: dict[str, Benchmark]) -> list[Path]:
    """The lm_eval/tasks sub-directories the benchmarks need (an error names a missing one)."""
    root, dirs = lm_eval_tasks_dir(), []
    for name in names:
        for sub in benchmarks[name].lm_eval_dirs:
            path = root / sub
            if not path.is_dir():
                from lm_eval import __version__

                raise UnknownTaskError(f"{name} needs lm-eval's tasks/{sub}, which lm-eval {__version__} "
                                       "does not have; install the version pinned in the eval extra")
            if path not in dirs:
                dirs.append(path)
    return dirs


def leaf_tasks(index: dict, names: Sequence[str]) -> list[str]:
    """The task (not group or tag) names reachable from ``names`` in an lm-eval task index."""
    leaves, pending = [], list(names)
    while pending:
        name = pending.pop(0)
        entry = index.get(name)
        if entry is None:
            raise UnknownTaskError(f"lm-eval task {name!r} not found in the indexed task directories")
        kind = entry.kind.name
        if kind == "GROUP":
            children = entry.cfg["task"] if isinstance(entry.cfg["task"], list) else [entry.cfg["task"]]
            pending += [c if isinstance(c, str) else c.get("task") or c.get("group") for c in children]
        elif kind == "TAG":
            pending += sorted(entry.tags)
        elif name not in leaves:
            leaves.append(name)
    return leaves


def data_splits(cfg: dict) -> tuple[str, str | None]:
    """(split evaluated, split the shots come from; None when the config writes them out),
    with lm-eval's precedence: test else validation; fewshot_split else train, validation, test."""
    evaluated = cfg.get("test_split") or cfg.get("validation_split")
    if evaluated is None:
        raise LocalDataError(f"task {cfg.get('task')!r} names no test or validation split")
    fewshot_config = cfg.get("fewshot_config") or {}
    fewshot = fewshot_config.get("split") or cfg.get("fewshot_split")
    if fewshot is None and fewshot_config.get("samples") is None:
        fewshot = cfg.get("training_split") or cfg.get("validation_split") or evaluated
    return evaluated, fewshot


def local_split_path(data_dir: str | Path, cfg: dict, split: str) -> Path:
    """DATA_DIR/<dataset_path>/<dataset_name>/<split>.jsonl (no dataset_name level when it is null)."""
    return Path(data_dir, cfg["dataset_path"], cfg.get("dataset_name") or "", f"{split}.jsonl")


def local_task_config(name: str, cfg: dict, yaml_path: Path, data_dir: str | Path) -> tuple[dict, list[Path]]:
    """(override config reading local JSONL, required files that are missing) for one leaf task."""
    evaluated, fewshot = data_splits(cfg)
    missing = [local_split_path(data_dir, cfg, s) for s in dict.fromkeys((evaluated, fewshot)) if s]
    missing = [p for p in missing if not p.is_file()]
    named = {key: cfg[key] for key in SPLIT_KEYS if cfg.get(key)}
    present = {split: local_split_path(data_dir, cfg, split) for split in set(named.values())}
    present = {split: path for split, path in present.items() if path.is_file()}
    override = {"include": str(yaml_path), "task": name, "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(path) for split, path in sorted(present.items())}}}
    override.update({key: None for key, split in named.items() if split not in present})
    return override, missing


def local_overrides(index: dict, leaves: Sequence[str], data_dir: str | Path) -> dict[str, dict]:
    """Leaf task name -> its override config reading local JSONL; all missing files in one error."""
    if not Path(data_dir).is_dir():
        raise LocalDataError(f"{data_dir}: no such data directory")
    overrides, missing = {}, []
    for name in leaves:
        entry = index[name]
        if entry.yaml_path is None:
            raise LocalDataError(f"task {name!r} has no YAML config, so it cannot read local data")
        overrides[name], lacking = local_task_config(name, entry.cfg, entry.yaml_path, data_dir)
        missing += lacking
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise LocalDataError(f"missing {len(missing)} local data file(s) (JSONL in the upstream schema): {shown}")
    for path in sorted({p for o in overrides.values() for p in o["dataset_kwargs"]["data_files"].values()}):
        check_local_records(path)
    return overrides


def check_local_records(path: str | Path) -> None:
    """Every line of a local data file a JSON object with the first one's fields (an export of the
    upstream dataset has them all, null where empty): else a one-line ``LocalDataError`` naming the
    line, where lm-eval would fail later inside ``datasets`` or a prompt template."""
    fields = None
    for where, record in jsonl_records(path, LocalDataError):
        if not isinstance(record, dict):
            raise LocalDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if fields is None:
            fields = list(record)
        elif lacking := [name for name in fields if name not in record]:
            raise LocalDataError(f"{where}: missing field {lacking[0]!r} (the file's first record has it)")


def write_local_overrides(overrides: dict[str, dict], out_dir: Path) -> None:
    """One YAML per task in ``out_dir``, which is replaced whole (written aside, then renamed)."""
    import yaml

    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    files.make_directory(tmp, "directory of the local task configs")
    for name, override in overrides.items():
        files.write_text(tmp / f"{name}.yaml", yaml.safe_dump(override, sort_keys=False))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


@contextlib.contextmanager
def task_errors():
    """Loading lm-eval's tasks (and their data) inside: a task's missing extra (e.g. MATH needs
    lm-eval[math]) is a ``MissingExtraError``, no connection to the HF hub (``datasets`` raises
    ``ConnectionError`` after its retries, whose logs are silenced) a ``HubDataError`` that points
    to local data."""
    from icegrt_jax.data.sources import quiet_hub_libraries

    try:
        with quiet_hub_libraries():
            yield
    except ModuleNotFoundError as e:
        raise MissingExtraError(str(e).splitlines()[0]) from None
    except ConnectionError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubDataError(f"{reason}: the benchmark data cannot be downloaded; evaluate on local files with "
                           "--data-dir (docs/eval.md), or set HF_HUB_OFFLINE=1 to use datasets already in the "
                           "HF cache") from None


def check_hub_data(names: Sequence[str], benchmarks: dict[str, Benchmark], config_dir: str | Path = CONFIG_DIR) -> None:
    """Load the hub datasets of the benchmarks ``names`` (resolved) now, before any model loads:
    no connection is a ``HubDataError`` at once, and the run then reads them from the HF cache."""
    from lm_eval.tasks import get_task_dict

    with task_errors():
        get_task_dict(list(names), _stock_task_manager(names, benchmarks, config_dir))


def check_local_data(names: Sequence[str], benchmarks: dict[str, Benchmark], data_dir: str | Path,
                     config_dir: str | Path = CONFIG_DIR) -> None:
    """Raise ``LocalDataError`` now, before any model loads, when ``data_dir`` lacks a file the
    benchmarks ``names`` (resolved) read."""
    index = _stock_task_manager(names, benchmarks, config_dir).task_index
    local_overrides(index, leaf_tasks(index, names), data_dir)


def _stock_task_manager(names: Sequence[str], benchmarks: dict[str, Benchmark], config_dir, extra=()):
    """A ``TaskManager`` over the stock task directories of ``names``, ours and ``extra`` ones."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in stock_dirs(names, benchmarks)] + [str(config_dir), *map(str, extra)]
    return TaskManager(include_defaults=False, include_path=paths)


def build_task_manager(names: Sequence[str], benchmarks: dict[str, Benchmark], data_dir: str | Path | None = None,
                       work_dir: str | Path | None = None, config_dir: str | Path = CONFIG_DIR):
    """An lm-eval ``TaskManager`` that knows the benchmarks ``names`` (resolved) and reads their
    data from ``data_dir`` when given (override YAMLs go to ``work_dir/local_tasks``, which must
    outlive the manager's use)."""
    manager = _stock_task_manager(names, benchmarks, config_dir)
    if data_dir is None:
        return manager
    if work_dir is None:
        raise ValueError("build_task_manager: data_dir needs a work_dir for the override YAMLs")
    override_dir = Path(work_dir) / "local_tasks"
    write_local_overrides(local_overrides(manager.task_index, leaf_tasks(manager.task_index, names), data_dir),
                          override_dir)
    return _stock_task_manager(names, benchmarks, config_dir, extra=[override_dir])


def run_benchmarks(model, names: Sequence[str], model_args: dict | None = None, data_dir: str | Path | None = None,
                   work_dir: str | Path | None = None, limit: int | None = None,
                   config_dir: str | Path = CONFIG_DIR) -> dict:
    """lm-eval's results dict for the requested names (see ``resolve_names``): ``model`` is an lm-eval
    ``LM`` or a registered model name (then built from ``model_args``), as for ``simple_evaluate``."""
    lm_eval = require_lm_eval()
    benchmarks = load_benchmarks(config_dir)
    resolved = resolve_names(names, benchmarks)
    with contextlib.ExitStack() as stack:  # without a work_dir, the override YAMLs live in a temporary one
        if work_dir is None and data_dir is not None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="icegrt_eval_"))
        manager = build_task_manager(resolved, benchmarks, data_dir, work_dir, config_dir)
        with task_errors():
            return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=resolved, task_manager=manager,
                                           limit=limit, log_samples=False)
