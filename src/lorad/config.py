"""config.toml -> frozen, validated settings.

The file is read once, at the edge, into the dataclasses below. Every key a user can set is a
field here; the field's type is the schema, and ``metadata={"check": ...}`` adds value checks.
An unknown key, a wrong type or a bad value raises :class:`ConfigError` naming the key path
(``training.lora_r: must be a positive integer, got -4``); the CLI turns it into exit code 78
(EX_CONFIG), which the systemd unit lists in RestartPreventExitStatus.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorad.state import StateDir

EX_CONFIG = 78

DEFAULT_PATHS = (Path("/etc/lorad/config.toml"), Path("config.toml"))

# The system message atomicguard's OpenAI-protocol generators (OllamaGenerator,
# HuggingFaceGenerator) send with every request: [selection] system_message's default.
ATOMICGUARD_SYSTEM = (
    "You are a Python programming assistant. Provide complete, runnable code in a markdown "
    "block:\n```python\n# code\n```"
)


class ConfigError(Exception):
    "The configuration is invalid; the message names every offending key path."

    def __init__(self, problems: list[str], path: Path | None = None):
        self.problems = problems
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(problems))


# -- value checks -------------------------------------------------------------------------------
# Each returns an error message (without the key path) or None.


def positive(v):
    return None if v > 0 else f"must be positive, got {v!r}"


def non_negative(v):
    return None if v >= 0 else f"must be zero or positive, got {v!r}"


def at_least(lo):
    def check(v):
        return None if v >= lo else f"must be at least {lo}, got {v!r}"

    return check


def fraction(v):
    return None if 0 <= v <= 1 else f"must be between 0 and 1, got {v!r}"


def open_fraction(v):
    return None if 0 < v < 1 else f"must be strictly between 0 and 1, got {v!r}"


def in_range(lo, hi):
    def check(v):
        return None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v!r}"

    return check


_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


def windows(v):
    for w in v:
        m = _WINDOW.match(w)
        if not m or (m.group(3) == "24" and m.group(4) != "00"):
            return f'each window must look like "HH:MM-HH:MM", got {w!r}'
        if m.group(1, 2) == m.group(3, 4):
            return f"window {w!r} is empty (start equals end)"
    return None


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def weekdays(v):
    bad = [d for d in v if d not in WEEKDAYS]
    return f"unknown weekday(s) {bad}; expected any of {list(WEEKDAYS)}" if bad else None


def timezone(v):
    if v == "local":
        return None
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(v)
    except Exception:
        return f'must be "local" or an IANA zone such as "Europe/Berlin", got {v!r}'
    return None


def learning_rate(v):
    # A sane range for LoRA fine-tuning: outside it a run either learns nothing or diverges.
    # This is an error, never a silent clamp.
    return None if 1e-7 <= v <= 1e-2 else f"must be between 1e-07 and 0.01 for LoRA training, got {v!r}"


def learning_rate_or_zero(v):
    return None if v == 0 else learning_rate(v)


def auto_or_bool(v):
    # Literal["auto", True, False] alone would let 1 and 0 through (1 == True in Python).
    return (
        None
        if isinstance(v, bool) or (isinstance(v, str) and v == "auto")
        else f'must be "auto", true or false, got {v!r}'
    )


def filter_policy(v):
    from lorad.buffer.traces import PolicyError, parse_policy  # lazily: no import cycle

    try:
        parse_policy(v)
    except PolicyError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class AccelerateConfig:
    """What lorad reads of an accelerate config file (``training.accelerate_config``)."""

    distributed_type: str  # upper case, "" when the file leaves it out
    fsdp_version: int  # fsdp_config.fsdp_version; accelerate's default is 1
    state_dict_type: str  # fsdp_config.fsdp_state_dict_type, "" when left out
    activation_checkpointing: bool  # fsdp_config.fsdp_activation_checkpointing
    offload_params: bool  # fsdp_config.fsdp_offload_params: the shards live in host memory
    num_processes: int | None
    num_machines: int | None

    @property
    def sharded(self) -> bool:
        """FSDP: each rank holds a shard of every parameter."""
        return self.distributed_type == "FSDP"


def read_accelerate_config(path) -> AccelerateConfig:
    """Parse an accelerate config file (YAML, or JSON, which YAML reads).

    Raises:
        OSError: it cannot be read.
        ValueError: it is not YAML, or not a mapping.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(str(e)[:120]) from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping of keys, got {_tname(data)}")
    fsdp = data.get("fsdp_config") or {}
    fsdp = fsdp if isinstance(fsdp, dict) else {}

    def number(value):
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return AccelerateConfig(
        distributed_type=str(data.get("distributed_type") or "").upper(),
        fsdp_version=number(fsdp.get("fsdp_version")) or 1,
        state_dict_type=str(fsdp.get("fsdp_state_dict_type") or "").upper(),
        activation_checkpointing=str(fsdp.get("fsdp_activation_checkpointing", False)).lower() == "true",
        offload_params=str(fsdp.get("fsdp_offload_params", False)).lower() == "true",
        num_processes=number(data.get("num_processes")),
        num_machines=number(data.get("num_machines")),
    )


def accelerate_config_file(v):
    """Data parallel (every rank holds the whole model) or FSDP2 (each rank a shard of it): lorad
    gathers the adapter whole from FSDP2's DTensor shards before it saves, checks and scores it
    (lorad.training.sharding). FSDP1, DeepSpeed and Megatron-LM partition the model in ways that
    gather does not read, so a save there would hold one rank's part of the adapter."""
    if not v:
        return None
    try:
        launch = read_accelerate_config(v)
    except OSError as e:
        return f"cannot read {v!r}: {e.strerror}"
    except ValueError as e:
        return f"{v!r} is not a valid accelerate config file: {e}"
    kind = launch.distributed_type
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        return (
            f"{v!r} sets distributed_type: {kind}; lorad shards the model only with FSDP2 (distributed_type: FSDP "
            f"and fsdp_config.fsdp_version: 2), whose shards it gathers to save the adapter whole; {kind}'s "
            f"partitions are not gathered that way, so a save would hold one rank's part"
        )
    if kind == "FSDP" and launch.fsdp_version != 2:
        return (
            f"{v!r} sets FSDP version {launch.fsdp_version} (fsdp_config.fsdp_version; absent means 1); lorad "
            f"supports FSDP2 only, whose DTensor shards it gathers to save the adapter whole: set "
            f"fsdp_config.fsdp_version: 2"
        )
    if kind == "FSDP" and launch.state_dict_type != "FULL_STATE_DICT":
        got = launch.state_dict_type or "absent, which FSDP2 takes as SHARDED_STATE_DICT"
        return (
            f"{v!r}: fsdp_config.fsdp_state_dict_type must be FULL_STATE_DICT (got {got}): each checkpoint "
            f"then holds the whole adapter (it is small), which a resume loads on any number of ranks"
        )
    if kind == "FSDP" and launch.activation_checkpointing:
        return (
            f"{v!r} sets fsdp_config.fsdp_activation_checkpointing: true; lorad turns activation "
            f"checkpointing on itself (training.gradient_checkpointing) and the two cannot both be on: "
            f"remove the key"
        )
    if (launch.num_machines or 1) > 1:
        return (
            f"{v!r} sets num_machines: {launch.num_machines}; lorad launches the ranks of one machine "
            f"(training.processes of them): set num_machines: 1"
        )
    return None


def cluster_address(v):
    if v in ("", "auto"):
        return None
    host, sep, port = v.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return (
            f'must be "" (a Ray instance on this machine for each job), "auto", "HOST:PORT" or '
            f'"ray://HOST:PORT", got {v!r}'
        )
    return None


def gpus_per_worker(v):
    if v in (0, 1):
        return None
    return f"must be 0 (CPU workers, gloo) or 1 (one GPU each, NCCL): a rank trains on one GPU, got {v!r}"


# [training] keys of launcher = "ray" alone.
RAY_KEYS = ("ray_address", "ray_workers", "ray_cpus_per_worker", "ray_gpus_per_worker")

PLACEHOLDERS = ("version", "path", "previous")  # what a command hook's argv may contain


def _template(part: str) -> str | None:
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(part) if f is not None]
    except ValueError as e:
        return f"not a valid template: {e} (write {{{{ and }}}} for literal braces)"
    for f in fields:
        if f not in PLACEHOLDERS:
            return (
                f"unknown placeholder {{{f}}}; expected {{version}}, {{path}} or {{previous}} "
                "(write {{ and }} for literal braces)"
            )
    return None


def _c(check, **kw):
    return field(metadata={"check": check}, **kw)


# -- sections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path = Path("/var/lib/lorad")
    # "" = $RUNTIME_DIRECTORY/lorad.sock when systemd sets it, else <state_dir>/lorad.sock
    socket: str = ""
    allowed_uids: tuple[int, ...] = ()
    allowed_group: str = ""
    watchdog: bool = True
    # Control connections one peer uid may hold open at once; one more closes its oldest idle one.
    max_connections_per_uid: int = _c(positive, default=64)

    @property
    def socket_path(self) -> Path:
        if self.socket:
            return Path(self.socket)
        runtime = os.environ.get("RUNTIME_DIRECTORY")
        if runtime:
            return Path(runtime.split(":")[0]) / "lorad.sock"
        return self.state_dir / "lorad.sock"


@dataclass(frozen=True)
class SourceSettings:
    kind: Literal["atomicguard", "jsonl"] = "atomicguard"
    path: Path = field(default=Path(""), metadata={"required": True})
    # Name under which the source's rows are kept in the buffer; defaults to kind:path.
    name: str = ""
    # jsonl only: a record with a numeric score at or above this counts as accepted.
    score_threshold: float = 0.5

    @property
    def key(self) -> str:
        return self.name or f"{self.kind}:{self.path}"


@dataclass(frozen=True)
class StoreSettings:
    sources: tuple[SourceSettings, ...] = ()
    max_file_bytes: int = _c(positive, default=8 * 1024 * 1024)
    # A file that fails to parse and was modified less than this many seconds ago is
    # treated as still being written and retried on the next scan instead of quarantined.
    settle_seconds: float = _c(non_negative, default=2.0)
    # Processes that read and parse when a scan meets thousands of new files (a first scan of
    # a big store); 0 = two (none on a single CPU).
    parse_workers: int = _c(non_negative, default=0)


@dataclass(frozen=True)
class BufferSettings:
    # "" = <state_dir>/buffer.sqlite3
    path: str = ""
    batch_size: int = _c(positive, default=2000)
    # "full" survives power loss; "normal" survives any process crash and is faster.
    synchronous: Literal["full", "normal"] = "full"


@dataclass(frozen=True)
class SelectionSettings:
    # First-try successes train too: they are the first attempts the generator got right
    # (README, "Training data and export").
    policy: str = _c(filter_policy, default="all_successes")
    # Which prompt an accepted answer is trained under: "first_attempt" (the specification
    # alone), "history" (with the rejected attempts and their feedback) or "both" (a
    # refinement gives one row of each; a first-try success has no history, so one row).
    conditioning: Literal["both", "first_attempt", "history"] = "both"
    min_retries: int = _c(positive, default=2)
    recent_days: int = _c(non_negative, default=30)
    action_pairs: tuple[str, ...] = ()
    max_history: int = _c(non_negative, default=3)
    max_artifact_chars: int = _c(positive, default=4000)
    # Each text of an artifact (answer, specification, constraints, feedback) is read for training,
    # held-out scoring and dedup cut to this many characters, with a note of the rest, so memory
    # does not grow with artifact size (a row trains on at most training.max_seq_length tokens).
    max_text_chars: int = _c(positive, default=65536)
    # "" or "FILE:KEY" of a prompts.json whose entry supplies the system role (lorad's layout)
    # or the whole prompt template (prompt_format "atomicguard").
    prompt_template: str = ""
    # "lorad": system = role + constraints, user = the specification (+ previous attempts);
    # "atomicguard": the exact messages atomicguard's generators send, rendered from the
    # prompt_template entry, with system_message as the system turn.
    prompt_format: Literal["lorad", "atomicguard"] = "lorad"
    system_message: str = ATOMICGUARD_SYSTEM
    dedup_similarity: float = _c(open_fraction, default=0.9)
    heldout_fraction: float = _c(open_fraction, default=0.15)
    # The held-out set's floor: new tasks are held out (never more than are trained on) until it
    # holds this many, and each family until it holds heldout_per_family; past the floor,
    # heldout_fraction decides. A family is the artifact metadata value under family_key, or the
    # action pair when that is "" or absent.
    heldout_min_tasks: int = _c(non_negative, default=24)
    heldout_per_family: int = _c(non_negative, default=2)
    family_key: str = ""
    replay_weighting: Literal["uniform", "retries"] = "retries"
    seed: int = 0

    def invalid(self) -> list[tuple[str, str]]:
        """(key, why) for values that type-check but could not run."""
        if self.prompt_format == "atomicguard" and not self.prompt_template:
            return [
                (
                    "prompt_template",
                    'prompt_format "atomicguard" renders the generator\'s prompt template: '
                    "name its prompts.json entry as FILE:KEY",
                )
            ]
        return []


@dataclass(frozen=True)
class ScheduleSettings:
    windows: tuple[str, ...] = _c(windows, default=("02:00-06:00",))
    timezone: str = _c(timezone, default="local")
    weekdays: tuple[str, ...] = _c(weekdays, default=())
    min_new_examples: int = _c(non_negative, default=20)
    # 0 disables the check; otherwise training waits while NVML reports a busier GPU.
    gpu_busy_percent: int = _c(in_range(0, 100), default=0)
    reconcile_interval: float = _c(positive, default=300.0)
    debounce_seconds: float = _c(non_negative, default=0.1)
    backoff_initial: float = _c(positive, default=60.0)
    backoff_max: float = _c(positive, default=3600.0)
    # A job whose worker is killed by a signal lorad did not send (the OOM killer, kill -9) is
    # paused and resumes from its checkpoints; the kill that makes this many in a row fails it.
    max_worker_kills: int = _c(positive, default=3)


@dataclass(frozen=True)
class TrainingSettings:
    # Hugging Face id, local directory or .gguf file
    base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # grpo: trl's GRPOTrainer on first-attempt prompts, evaluation.guard_command as the reward
    # "sft+grpo": one job, SFT on the accepted answers, then GRPO from that adapter.
    method: Literal["sft", "dpo", "kto", "grpo", "sft+grpo"] = "sft"
    lora_r: int = _c(positive, default=4)
    lora_alpha: int = _c(positive, default=8)
    lora_dropout: float = _c(fraction, default=0.05)
    target_modules: tuple[str, ...] = ("all-linear",)
    learning_rate: float = _c(learning_rate, default=2e-4)
    # 0 = derive from epochs
    max_steps: int = _c(non_negative, default=0)
    epochs: float = _c(positive, default=1.0)
    batch_size: int = _c(positive, default=4)
    grad_accum: int = _c(positive, default=1)
    max_seq_length: int = _c(positive, default=512)
    quantization: Literal["auto", "4bit", "none"] = "auto"
    warm_start: bool = True
    replay_ratio: float = _c(fraction, default=0.5)
    train_examples: int = _c(positive, default=2000)
    processes: int = _c(positive, default=1)
    # An accelerate config file for processes > 1: data parallel, or FSDP2 (distributed_type:
    # FSDP, fsdp_version: 2, fsdp_state_dict_type: FULL_STATE_DICT); FSDP1 and DeepSpeed refused.
    accelerate_config: str = _c(accelerate_config_file, default="")
    save_steps: int = _c(positive, default=50)
    gradient_checkpointing: bool = True
    # Padding-free packing of SFT rows: "auto" packs where the model keeps packed rows apart
    # exactly (checked on the loaded model), true refuses a run where it would not, false never.
    packing: Literal["auto", True, False] = _c(auto_or_bool, default="auto")
    # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) on CUDA: "auto" when liger_kernel is
    # importable, true refuses a run without CUDA or liger_kernel, false never.
    liger_kernel: Literal["auto", True, False] = _c(auto_or_bool, default="auto")
    seed: int = 0
    # Fraction of device memory the run may plan to use (the rest is headroom).
    memory_headroom: float = _c(open_fraction, default=0.9)
    # GRPO only: completions sampled per prompt (batch_size * grad_accum counts completions,
    # so it must be a multiple of this), their token budget (generation also stops once the
    # first fenced code block is closed), the sampling temperature, and the KL coefficient
    # against the starting adapter (0 = no reference pass).
    num_generations: int = _c(at_least(2), default=4)
    max_completion_length: int = _c(positive, default=256)
    temperature: float = _c(positive, default=1.0)
    beta: float = _c(non_negative, default=0.0)
    # method "sft+grpo" only: the GRPO phase's steps (0 = derive from epochs over the prompts)
    # and learning rate (0 = learning_rate); the SFT phase takes max_steps and learning_rate.
    grpo_steps: int = _c(non_negative, default=0)
    grpo_learning_rate: float = _c(learning_rate_or_zero, default=0.0)
    # Where the worker's ranks run: "local" = this machine (one process, or `processes` through
    # accelerate launch); "ray" = a Ray Train TorchTrainer of ray_workers workers on a Ray cluster
    # (the optional extra lorad[ray]; the daemon never imports ray, the worker subprocess does).
    launcher: Literal["local", "ray"] = "local"
    # launcher "ray" only: "" = a Ray instance started on this machine for each job and stopped
    # after it; "auto" = the cluster this machine is a node of; "HOST:PORT" (its GCS) or
    # "ray://HOST:10001" (Ray Client, which needs ray[client]).
    ray_address: str = _c(cluster_address, default="")
    ray_workers: int = _c(at_least(1), default=1)
    ray_cpus_per_worker: float = _c(positive, default=1.0)
    # 0 = CPU workers (gloo); 1 = one GPU each (NCCL): a rank trains on one GPU.
    ray_gpus_per_worker: float = _c(gpus_per_worker, default=0.0)

    @property
    def phases(self) -> tuple[str, ...]:
        """The trainers a job of ``method`` runs, in order."""
        return tuple(self.method.split("+"))

    @property
    def launch(self) -> AccelerateConfig | None:
        """The accelerate config file's settings (None without one)."""
        return read_accelerate_config(self.accelerate_config) if self.accelerate_config else None

    @property
    def shards(self) -> int:
        """The ranks the model is sharded over: ``processes`` under an FSDP2 accelerate config,
        else 1 (every process holds the whole model)."""
        launch = self.launch
        return self.processes if launch is not None and launch.sharded else 1

    def _launch_problems(self) -> list[tuple[str, str]]:
        """``processes`` against what the accelerate config says (its file was checked at load)."""
        if not self.accelerate_config:
            return []
        launch = read_accelerate_config(self.accelerate_config)
        if launch.num_processes is not None and launch.num_processes != self.processes:
            return [
                (
                    "processes",
                    f"must equal num_processes in training.accelerate_config ({launch.num_processes}), "
                    f"got {self.processes}",
                )
            ]
        if launch.sharded and self.processes < 2:
            return [
                (
                    "processes",
                    "an FSDP2 accelerate config shards the model over the ranks: must be at least 2, "
                    f"got {self.processes}",
                )
            ]
        return []

    def invalid(self) -> list[tuple[str, str]]:
        """(key, why) for values that type-check but could not run, judged with ``method``."""
        found = []
        if "grpo" in self.phases and (self.batch_size * self.grad_accum) % self.num_generations:
            found.append(
                (
                    "num_generations",
                    f"must divide batch_size * grad_accum ({self.batch_size} * "
                    f'{self.grad_accum}) for method "{self.method}": a GRPO step holds whole '
                    f"groups of completions, got {self.num_generations}",
                )
            )
        if self.method != "sft+grpo":
            found += [
                (
                    key,
                    f'applies to method "sft+grpo" only, and method = {self.method!r}; '
                    f"remove it (max_steps and learning_rate set a single-method job)",
                )
                for key in ("grpo_steps", "grpo_learning_rate")
                if getattr(self, key)
            ]
        found += self._launch_problems()
        if self.packing is True and "sft" not in self.phases:
            found.append(("packing", f'true packs SFT rows only, and method = {self.method!r}; use "auto" or false'))
        if self.liger_kernel is True:
            import importlib.util

            if importlib.util.find_spec("liger_kernel") is None:
                found.append(
                    (
                        "liger_kernel",
                        "true needs the liger-kernel package (pip install liger-kernel) "
                        'and CUDA; it is not installed (use "auto" or false)',
                    )
                )
        return found + self._launcher_problems()

    def _launcher_problems(self) -> list[tuple[str, str]]:
        """(key, why) for the launcher and the keys that belong to the other launcher."""
        import importlib.util

        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.launcher == "local":
            return [
                (key, 'applies to launcher = "ray" only, and launcher = "local"; remove it or set launcher = "ray"')
                for key in RAY_KEYS
                if getattr(self, key) != defaults[key]
            ]
        found = []
        if importlib.util.find_spec("ray") is None:
            found.append(
                (
                    "launcher",
                    '"ray" runs the worker as a Ray Train job, and ray is not installed in this Python; '
                    "install the extra: pip install 'lorad[ray]'",
                )
            )
        elif self.ray_address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
            found.append(
                ("ray_address", f"{self.ray_address!r} goes through Ray Client, which needs pip install 'ray[client]'")
            )
        found += [
            (
                key,
                'applies to launcher = "local" only, and launcher = "ray" (whose ranks are the ray_workers '
                "Ray workers); remove it",
            )
            for key in ("processes", "accelerate_config")
            if getattr(self, key) != defaults[key]
        ]
        return found


@dataclass(frozen=True)
class EvaluationSettings:
    # argv run on each generated artifact (stdin); "" disables the guard pass-rate check.
    guard_command: tuple[str, ...] = ()
    # Held-out tasks scored per cycle: the oldest ones, so consecutive versions meet the same set.
    max_heldout: int = _c(positive, default=200)
    guard_timeout: float = _c(positive, default=30.0)
    max_new_tokens: int = _c(positive, default=256)
    eval_batch_size: int = _c(positive, default=8)
    # Relative drop in held-out loss the candidate must achieve (0.01 = 1 %).
    min_improvement: float = _c(fraction, default=0.01)
    # Confidence of the paired (exact McNemar) test of first-attempt acceptance in the gate
    # and in the re-scoring rollback: a difference counts when p < 1 - confidence.
    confidence: float = _c(open_fraction, default=0.95)
    min_heldout_examples: int = _c(positive, default=5)
    # Automatic rollback: re-score the active adapter against the previous blessed one.
    rescore_active: bool = True
    rollback_threshold: float = _c(fraction, default=0.02)
    # Live rollback from the store: metadata key naming the adapter that produced an artifact.
    live_metadata_key: str = "adapter_version"
    live_confidence: float = _c(open_fraction, default=0.95)
    live_min_attempts: int = _c(positive, default=30)

    # Keys this section no longer has, and what replaced them (refused at load with the text).
    REMOVED: typing.ClassVar[dict[str, str]] = {
        "max_regression": "removed: the gate tests first-attempt acceptance as pairs (exact McNemar "
        "test at evaluation.confidence) instead of allowing a fixed fall; delete the key",
        "generation_samples": "removed: every held-out task is generated for; evaluation.max_heldout "
        "caps the held-out set; delete the key",
    }

    def invalid(self) -> list[tuple[str, str]]:
        """(key, why) for values that type-check but could not run."""
        if self.guard_command and not self.guard_command[0]:
            return [("guard_command[0]", "must name the program to run, got ''")]
        return []


@dataclass(frozen=True)
class RegistrySettings:
    keep: int = _c(positive, default=5)
    keep_best: bool = True


@dataclass(frozen=True)
class PublishSettings:
    kind: Literal["command", "vllm", "gguf", "ollama"] = "command"
    # command: argv with {version}, {path}, {previous} placeholders
    argv: tuple[str, ...] = ()
    # vllm, ollama: base URL of the server, e.g. http://127.0.0.1:8000 (vLLM), :11434 (Ollama)
    url: str = ""
    name_prefix: str = "lorad"
    # gguf, ollama: what the adapter applies to (the Modelfile's FROM): an absolute path to a
    # .gguf file, or the name of a model Ollama has; "" = training.base_model when it is a .gguf
    base: str = ""
    api_key_env: str = ""
    timeout: float = _c(positive, default=30.0)
    retries: int = _c(non_negative, default=3)
    backoff: float = _c(non_negative, default=1.0)
    required: bool = False
    # vllm: put the server to sleep (POST /sleep?level=1) while the worker trains, wake it after;
    # the server needs --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (lorad.release.gpu_share).
    sleep_during_training: bool = False
    # ollama: how <prefix>-<version> is created: "adapter" (the base + adapter.gguf, which Ollama
    # refuses from 0.34.1), "merged" (merged.gguf, the adapter merged into a .gguf base: a whole
    # model in every version), "auto" (merged.gguf in every version; GET /api/version decides,
    # the adapter route below 0.34.1 unless refused).
    ollama_mode: Literal["adapter", "merged", "auto"] = "adapter"

    def invalid(self) -> list[tuple[str, str]]:
        """(key, why) for values that type-check but could not run, judged with ``kind``."""
        found = []
        if self.sleep_during_training and self.kind != "vllm":
            return [("sleep_during_training", f'only a kind = "vllm" hook can sleep, not kind = "{self.kind}"')]
        if self.ollama_mode != "adapter" and self.kind != "ollama":
            return [("ollama_mode", f'only a kind = "ollama" hook has a mode, not kind = "{self.kind}"')]
        if self.kind in ("gguf", "ollama") and self.base.endswith(".gguf") and not Path(self.base).is_absolute():
            found.append(
                ("base", f"must be an absolute path to a .gguf file (or an Ollama model name), got {self.base!r}")
            )
        if self.kind in ("vllm", "ollama"):
            from urllib.parse import urlsplit

            try:
                parts = urlsplit(self.url)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            except ValueError:
                ok = False
            return found + (
                [] if ok else [("url", f"must be an http:// or https:// URL with a host, got {self.url!r}")]
            )
        if self.kind == "gguf":
            return found
        if not self.argv:
            return [("argv", "must be a non-empty list of strings")]
        found = [("argv[0]", f"must name the program to run, got {self.argv[0]!r}")] if not self.argv[0] else []
        found += [(f"argv[{i}]", why) for i, part in enumerate(self.argv) if (why := _template(part))]
        return found


def listen_address(v):
    if not v:
        return None
    host, sep, port = v.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f'must be "HOST:PORT" such as "127.0.0.1:9464" (or "" for no listener), got {v!r}'
    return None


def is_loopback(host: str) -> bool:
    """``host`` (an address or a name) is this machine's loopback: all the unit's sandbox lets in."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class MetricsSettings:
    # "HOST:PORT" serving /metrics for Prometheus, e.g. "127.0.0.1:9464"; "" = no listener.
    listen: str = _c(listen_address, default="")
    # Loopback only unless this is true (the systemd unit's IPAddressAllow=localhost must widen too).
    allow_remote: bool = False
    # node_exporter textfile collector: this file is rewritten atomically after every cycle.
    textfile: str = ""

    @property
    def host(self) -> str:
        host = self.listen.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def invalid(self) -> list[tuple[str, str]]:
        if self.listen and not self.allow_remote and not is_loopback(self.host):
            return [
                (
                    "listen",
                    f"{self.host!r} is not a loopback address; set metrics.allow_remote = true "
                    f"(and widen the unit's IPAddressAllow) to listen beyond this machine",
                )
            ]
        if self.textfile and not self.textfile.endswith(".prom"):
            return [("textfile", f"node_exporter reads only files named *.prom, got {self.textfile!r}")]
        if self.textfile and not Path(self.textfile).is_absolute():
            return [("textfile", f"must be an absolute path, got {self.textfile!r}")]
        return []


@dataclass(frozen=True)
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto = console on a TTY, JSON lines otherwise (journald)
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class Settings:
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    buffer: BufferSettings = field(default_factory=BufferSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    publish: tuple[PublishSettings, ...] = ()
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    # Where the settings came from (None for built-in defaults); not a config key.
    source_path: Path | None = field(default=None, metadata={"internal": True})

    def invalid(self) -> list[tuple[str, str]]:
        """(key path, why) for sections that are valid alone but not together."""
        found = []
        if "grpo" in self.training.phases and not self.evaluation.guard_command:
            found.append(
                (
                    "training.method",
                    f'method "{self.training.method}" takes its GRPO reward from '
                    "evaluation.guard_command, which is not set; set the guard command or choose "
                    "another method",
                )
            )
        exporting = [(i, t) for i, t in enumerate(self.publish) if t.kind in ("gguf", "ollama")]
        bases = set()
        for i, t in exporting:
            base = t.base or (self.training.base_model if self.training.base_model.endswith(".gguf") else "")
            if not base:
                found.append(
                    (
                        f"publish[{i}].base",
                        f"required for kind {t.kind!r}: training.base_model "
                        f"({self.training.base_model!r}) is not a .gguf file; name the base GGUF file "
                        "(or an Ollama model) the adapter applies to",
                    )
                )
            elif t.ollama_mode != "adapter" and not base.endswith(".gguf"):
                found.append(
                    (
                        f"publish[{i}].ollama_mode",
                        f'"{t.ollama_mode}" merges the adapter into the base GGUF file, but the base is '
                        f'the Ollama model {base!r}; name the base .gguf file, or use ollama_mode = "adapter"',
                    )
                )
            bases.add(base)
        if len(bases) > 1:
            found.append(
                (
                    f"publish[{exporting[-1][0]}].base",
                    "every gguf and ollama table must name the same "
                    f"base (one adapter.gguf and Modelfile per version), got {sorted(bases)}",
                )
            )
        untied = [m for m in self.training.target_modules if m.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head")]
        if exporting and untied:
            found.append(
                (
                    "training.target_modules",
                    f"{untied} cannot be exported as a GGUF LoRA adapter "
                    f"(publish[{exporting[0][0]}] is kind {exporting[0][1].kind!r}): llama.cpp takes "
                    "no LoRA on embeddings or lm_head",
                )
            )
        return found

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir

    @property
    def state(self) -> StateDir:
        """The state directory's paths (:class:`lorad.state.StateDir`)."""
        return StateDir(self.daemon.state_dir)

    @property
    def buffer_path(self) -> Path:
        return Path(self.buffer.path) if self.buffer.path else self.state.buffer


# -- loading ------------------------------------------------------------------------------------


def find_config(explicit: str | os.PathLike | None = None) -> Path | None:
    """The config file to use: --config, then $LORAD_CONFIG, then /etc/lorad, then ./config.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("LORAD_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_PATHS:
        if candidate.is_file():
            return candidate
    return None


def load(path: str | os.PathLike | None = None) -> Settings:
    """Read and validate a config file; with no file anywhere, the built-in defaults.

    Raises:
        ConfigError: the file is missing, is not TOML, or any key is unknown or invalid.
    """
    found = find_config(path)
    if found is None:
        return Settings()
    try:
        text = found.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read config file: {e.strerror}"], found) from None
    except UnicodeDecodeError:
        raise ConfigError(["config file is not UTF-8"], found) from None
    settings = loads(text, found)
    return settings


def loads(text: str, path: Path | None = None) -> Settings:
    """Validate TOML text into Settings (relative paths resolve against the file's folder)."""
    try:
        raw = tomllib.loads(text)
    except ValueError as e:  # TOMLDecodeError, or an integer past int()'s digit limit
        raise ConfigError([f"not valid TOML: {str(e)[:200]}"], path) from None
    problems: list[str] = []
    base = path.parent.resolve() if path else Path.cwd()
    settings = _build(Settings, raw, "", problems, base)
    if problems:
        raise ConfigError(problems, path)
    return dataclasses.replace(settings, source_path=path)


def _build(cls, raw: Any, prefix: str, problems: list[str], base: Path):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or '<root>'}: must be a table, got {_tname(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    removed = getattr(cls, "REMOVED", {})
    for key in raw:
        if key in removed:
            problems.append(f"{prefix}{key}: {removed[key]}")
        elif key not in known:
            choices = ", ".join(sorted(known))
            problems.append(f"{prefix}{key}: unknown key (expected one of: {choices})")
    values = {}
    for name, f in known.items():
        if name not in raw:
            if f.metadata.get("required"):
                problems.append(f"{prefix}{name}: required key is missing")
            continue
        keypath = prefix + name
        before = len(problems)
        value = _convert(hints[name], raw[name], keypath, problems, base)
        if len(problems) > before:
            continue
        check = f.metadata.get("check")
        message = check(value) if check else None
        if message:
            problems.append(f"{keypath}: {message}")
            continue
        values[name] = value
    try:
        built = cls(**values)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        problems.append(f"{prefix.rstrip('.')}: {e}")
        return cls()
    if hasattr(built, "invalid") and len(values) == len([n for n in known if n in raw]):
        problems.extend(f"{prefix}{key}: {message}" for key, message in built.invalid())
    return built


def _convert(tp, value, keypath: str, problems: list[str], base: Path):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, keypath + ".", problems, base)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{keypath}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if isinstance(value, str) and item_tp is str:
            # A single string where a list is expected: a command line, a module name.
            value = value.split() if keypath.endswith(("argv", "guard_command")) else [value]
        if not isinstance(value, list):
            problems.append(f"{keypath}: must be a list, got {_tname(value)}")
            return ()
        items = []
        for i, item in enumerate(value):
            items.append(_convert(item_tp, item, f"{keypath}[{i}]", problems, base))
        return tuple(items)
    if origin in (types.UnionType, typing.Union):
        # Only "X | None" is used in settings.
        if value is None:
            return None
        return _convert(typing.get_args(tp)[0], value, keypath, problems, base)
    if tp is Path:
        if not isinstance(value, str):
            problems.append(f"{keypath}: must be a path string, got {_tname(value)}")
            return Path("")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() or not value else base / p
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{keypath}: must be true or false, got {_tname(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{keypath}: must be an integer, got {_tname(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{keypath}: must be a number, got {_tname(value)} {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{keypath}: must be a string, got {_tname(value)} {value!r}")
        return value
    raise TypeError(f"unsupported settings type {tp!r} at {keypath}")  # pragma: no cover


def _tname(value) -> str:
    return {
        dict: "a table",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)
