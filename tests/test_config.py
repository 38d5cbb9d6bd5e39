"""Config loading: defaults, the documented example, and errors that name their key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from lorad import config
from lorad.config import EX_CONFIG, ConfigError

ROOT = Path(__file__).parent.parent


def test_documented_example_loads_and_matches_the_defaults():
    """config.toml documents every key with its default: loading it must equal the built-in settings."""
    loaded = config.load(ROOT / "config.toml")
    defaults = config.Settings()
    for section in (
        "daemon",
        "buffer",
        "selection",
        "schedule",
        "training",
        "evaluation",
        "registry",
        "metrics",
        "logging",
    ):
        assert getattr(loaded, section) == getattr(defaults, section), section
    assert loaded.store.max_file_bytes == defaults.store.max_file_bytes
    assert loaded.store.settle_seconds == defaults.store.settle_seconds


def test_every_settings_key_is_documented_in_the_example():
    import dataclasses

    text = (ROOT / "config.toml").read_text()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            yield f.name

    for cls in (
        config.DaemonSettings,
        config.StoreSettings,
        config.BufferSettings,
        config.SelectionSettings,
        config.ScheduleSettings,
        config.TrainingSettings,
        config.EvaluationSettings,
        config.RegistrySettings,
        config.PublishSettings,
        config.MetricsSettings,
        config.LoggingSettings,
        config.SourceSettings,
    ):
        for key in keys(cls):
            if key == "sources":
                continue
            assert f"{key} =" in text, f"{cls.__name__}.{key} is not documented in config.toml"


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("[training]\nlora_r = -4", "training.lora_r: must be positive, got -4"),
        ("[training]\nlora_r = 'four'", "training.lora_r: must be an integer, got a string 'four'"),
        ("[training]\nlearning_rate = 3.0", "training.learning_rate: must be between 1e-07 and 0.01"),
        (
            "[training]\nmethod = 'ppo'",
            "training.method: must be one of ['sft', 'dpo', 'kto', 'grpo', 'sft+grpo'], got 'ppo'",
        ),
        ("[trainin]\nlora_r = 4", "trainin: unknown key"),
        ("[training]\nlora_rank = 4", "training.lora_rank: unknown key"),
        ("[[store.sources]]\nkind = 'atomicguard'", "store.sources[0].path: required key is missing"),
        ("[[store.sources]]\nkind = 'git'\npath = '/x'", "store.sources[0].kind: must be one of"),
        ("[schedule]\nwindows = ['2am-6am']", 'schedule.windows: each window must look like "HH:MM-HH:MM"'),
        ("[schedule]\nweekdays = ['monday']", "schedule.weekdays: unknown weekday(s) ['monday']"),
        ("[schedule]\ntimezone = 'Mars/Olympus'", 'schedule.timezone: must be "local" or an IANA zone'),
        ("[selection]\nheldout_fraction = 1.5", "selection.heldout_fraction: must be strictly between 0 and 1"),
        ("[daemon]\nallowed_uids = [1000, 'bob']", "daemon.allowed_uids[1]: must be an integer"),
        ("[evaluation]\nrescore_active = 'yes'", "evaluation.rescore_active: must be true or false"),
        ("[[publish]]\nkind = 'webhook'", "publish[0].kind: must be one of ['command', 'vllm', 'gguf', 'ollama']"),
        ("[[publish]]\nargv = []", "publish[0].argv: must be a non-empty list of strings"),
        ("[[publish]]\nargv = ''", "publish[0].argv: must be a non-empty list of strings"),
        ("[[publish]]\nargv = ['x']\n[[publish]]\nkind = 'command'", "publish[1].argv: must be a non-empty list"),
        ("[[publish]]\nargv = ['', '{version}']", "publish[0].argv[0]: must name the program to run, got ''"),
        (
            "[[publish]]\nargv = ['x', '--v={versoin}']",
            "publish[0].argv[1]: unknown placeholder {versoin}; expected {version}, {path} or {previous}",
        ),
        ("[[publish]]\nargv = ['x', '{0}']", "publish[0].argv[1]: unknown placeholder {0}"),
        ("[[publish]]\nargv = ['x', 'a}b']", "publish[0].argv[1]: not a valid template: Single '}' encountered"),
        ("[[publish]]\nkind = 'vllm'", "publish[0].url: must be an http:// or https:// URL with a host, got ''"),
        ("[[publish]]\nkind = 'vllm'\nurl = '127.0.0.1:8000'", "publish[0].url: must be an http:// or https:// URL"),
        ("[[publish]]\nkind = 'vllm'\nurl = 'http://'", "publish[0].url: must be an http:// or https:// URL"),
        ("[evaluation]\nguard_command = ['', 'x']", "evaluation.guard_command[0]: must name the program to run"),
        ("daemon = 3", "daemon: must be a table"),
        ("[training]\npacking = 1", 'training.packing: must be "auto", true or false, got 1'),
        ("[training]\npacking = 'yes'", "training.packing: must be one of ['auto', True, False]"),
        ("[training]\nmethod = 'dpo'\npacking = true", "training.packing: true packs SFT rows only"),
        ("[training]\nliger_kernel = 0", 'training.liger_kernel: must be "auto", true or false, got 0'),
        ("[training\n", "not valid TOML"),
    ],
)
def test_bad_value_names_the_key_path(toml, expected):
    with pytest.raises(ConfigError) as err:
        config.loads(toml)
    assert expected in str(err.value)


def test_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        config.loads("[training]\nlora_r = 0\nbatch_size = -1\n[logging]\nlevel = 'loud'")
    assert len(err.value.problems) == 3


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    cfg = tmp_path / "etc" / "lorad.toml"
    cfg.parent.mkdir()
    cfg.write_text('[daemon]\nstate_dir = "state"\n[[store.sources]]\nkind = "jsonl"\npath = "../log.jsonl"\n')
    s = config.load(cfg)
    assert s.state_dir == tmp_path / "etc" / "state"
    assert s.store.sources[0].path.resolve() == (tmp_path / "log.jsonl").resolve()


def test_config_is_found_through_the_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[training]\nlora_r = 16\n")
    monkeypatch.setenv("LORAD_CONFIG", str(cfg))
    assert config.load().training.lora_r == 16


def test_settings_are_frozen():
    s = config.Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.training.lora_r = 8  # type: ignore[misc]


def test_cli_exits_78_with_the_key_path(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[training]\nlora_r = -4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(cfg), "ingest"], capture_output=True, text=True
    )
    assert proc.returncode == EX_CONFIG == 78
    assert "training.lora_r: must be positive, got -4" in proc.stderr


def test_a_publish_hook_that_could_not_run_is_refused_at_load_with_exit_78(tmp_path):
    """`argv = []` used to pass and fail the job at its promotion, after `current` had moved."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[[publish]]\nargv = []\n')
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(cfg), "serve"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == EX_CONFIG
    assert proc.stderr.strip() == f"lorad: config error: {cfg}: publish[0].argv: must be a non-empty list of strings"


def test_publish_tables_that_can_run_are_accepted():
    s = config.loads(
        "[[publish]]\nargv = ['systemctl', 'reload', 'x@{version}', '{path}', '{previous}']\n"
        "[[publish]]\nkind = 'vllm'\nurl = 'https://vllm.internal:8000'\n"
    )
    assert [p.kind for p in s.publish] == ["command", "vllm"]


def test_cli_exits_78_when_the_config_file_is_missing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(tmp_path / "nope.toml"), "ingest"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 78
    assert "cannot read config file" in proc.stderr


FSDP2 = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""


def _training(path, processes=2) -> str:
    return f'[training]\nprocesses = {processes}\naccelerate_config = "{path}"\n'


def test_an_fsdp2_accelerate_config_is_accepted_and_shards_over_the_processes(tmp_path):
    fsdp2 = tmp_path / "fsdp2.yaml"
    fsdp2.write_text(FSDP2)
    training = config.loads(_training(fsdp2)).training
    assert training.accelerate_config == str(fsdp2)
    assert training.shards == 2
    ddp = tmp_path / "ddp.yaml"
    ddp.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    assert config.loads(_training(ddp)).training.shards == 1
    assert config.loads("[training]\nprocesses = 2\n").training.shards == 1


@pytest.mark.parametrize(
    "text, says",
    [
        (
            "distributed_type: FSDP\nnum_processes: 2\n",
            r"sets FSDP version 1 \(fsdp_config.fsdp_version; absent means 1\); lorad supports FSDP2 only",
        ),
        (
            FSDP2.replace("fsdp_version: 2", "fsdp_version: 1"),
            r"sets FSDP version 1 .*set fsdp_config.fsdp_version: 2",
        ),
        (
            "distributed_type: DEEPSPEED\nnum_processes: 2\n",
            r"sets distributed_type: DEEPSPEED; lorad shards the model only with FSDP2 .*one rank's part",
        ),
        ("distributed_type: MEGATRON_LM\n", r"sets distributed_type: MEGATRON_LM; lorad shards the model only"),
        (
            FSDP2.replace("  fsdp_state_dict_type: FULL_STATE_DICT\n", ""),
            r"fsdp_state_dict_type must be FULL_STATE_DICT \(got absent, which FSDP2 takes as SHARDED_STATE_DICT\)",
        ),
        (
            FSDP2.replace("FULL_STATE_DICT", "SHARDED_STATE_DICT"),
            r"fsdp_state_dict_type must be FULL_STATE_DICT \(got SHARDED_STATE_DICT\)",
        ),
        (
            FSDP2 + "  fsdp_activation_checkpointing: true\n",
            r"fsdp_activation_checkpointing: true; lorad turns activation checkpointing on itself",
        ),
        (FSDP2.replace("num_machines: 1", "num_machines: 2"), r"num_machines: 2; lorad launches the ranks of one"),
        ("[1, 2]\n", r"is not a valid accelerate config file: expected a mapping of keys, got a list"),
        ("distributed_type: [FSDP\n", r"is not a valid accelerate config file"),
    ],
)
def test_accelerate_configs_lorad_cannot_run_are_refused_at_load_with_the_reason(tmp_path, text, says):
    """FSDP1, DeepSpeed and Megatron-LM partition the model in ways lorad's gather does not read;
    an FSDP2 config must checkpoint the whole adapter and leave activation checkpointing to lorad."""
    path = tmp_path / "accelerate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"training.accelerate_config: .*" + says):
        config.loads(_training(path))


def test_an_unreadable_accelerate_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"training.accelerate_config: cannot read"):
        config.loads(f'[training]\naccelerate_config = "{tmp_path / "missing.yaml"}"\n')


def test_processes_must_match_the_accelerate_configs_num_processes(tmp_path):
    fsdp2 = tmp_path / "fsdp2.yaml"
    fsdp2.write_text(FSDP2)
    with pytest.raises(
        ConfigError, match=r"training.processes: must equal num_processes in training.accelerate_config \(2\), got 4"
    ):
        config.loads(_training(fsdp2, processes=4))
    fsdp2.write_text(FSDP2.replace("num_processes: 2\n", ""))
    with pytest.raises(ConfigError, match=r"training.processes: an FSDP2 accelerate config shards the model over"):
        config.loads(_training(fsdp2, processes=1))
    assert config.loads(_training(fsdp2, processes=3)).training.shards == 3


def test_cli_exits_78_naming_the_key_for_an_fsdp1_config(tmp_path):
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    toml = tmp_path / "config.toml"
    toml.write_text(_training(fsdp1))
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(toml), "ingest"], capture_output=True, text=True
    )
    assert proc.returncode == 78
    assert "training.accelerate_config:" in proc.stderr and "FSDP2 only" in proc.stderr


@pytest.mark.parametrize(
    "key, says",
    [
        ("max_regression = 0.0", "exact McNemar test at evaluation.confidence"),
        ("generation_samples = 32", "evaluation.max_heldout caps"),
    ],
)
def test_removed_evaluation_keys_are_refused_with_what_replaced_them(tmp_path, key, says):
    path = tmp_path / "config.toml"
    path.write_text(f"[evaluation]\n{key}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(path), "ingest"], capture_output=True, text=True
    )
    assert proc.returncode == EX_CONFIG
    assert f"evaluation.{key.split()[0]}: removed: " in proc.stderr and says in proc.stderr


def test_conditioning_and_the_paired_gate_keys_are_validated():
    with pytest.raises(
        ConfigError,
        match=r"selection.conditioning: must be one of \['both', 'first_attempt', "
        r"'history'\], got 'all'",
    ):
        config.loads('[selection]\nconditioning = "all"\n')
    with pytest.raises(ConfigError, match="evaluation.confidence: must be strictly between 0 and 1"):
        config.loads("[evaluation]\nconfidence = 1.0\n")
    with pytest.raises(ConfigError, match="evaluation.max_heldout: must be positive"):
        config.loads("[evaluation]\nmax_heldout = 0\n")


def test_grpo_without_a_guard_command_names_training_method(tmp_path):
    cfg = tmp_path / "grpo.toml"
    cfg.write_text('[training]\nmethod = "grpo"\n')
    with pytest.raises(
        ConfigError,
        match=r"training\.method: method \"grpo\" takes its GRPO reward from "
        r"evaluation\.guard_command, which is not set",
    ):
        config.load(cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(cfg), "ingest"], capture_output=True, text=True
    )
    assert proc.returncode == EX_CONFIG
    assert "training.method" in proc.stderr


def test_sft_then_grpo_needs_a_guard_and_its_grpo_keys_belong_to_it_alone():
    with pytest.raises(ConfigError, match=r"training\.method: method \"sft\+grpo\" takes its GRPO reward"):
        config.loads('[training]\nmethod = "sft+grpo"\n')
    s = config.loads(
        '[training]\nmethod = "sft+grpo"\ngrpo_steps = 6\ngrpo_learning_rate = 1e-3\n'
        '[evaluation]\nguard_command = ["guard"]\n'
    )
    assert s.training.phases == ("sft", "grpo") and (s.training.grpo_steps, s.training.grpo_learning_rate) == (6, 1e-3)
    with pytest.raises(ConfigError, match=r"training\.grpo_steps: applies to method \"sft\+grpo\" only"):
        config.loads("[training]\ngrpo_steps = 6\n")
    with pytest.raises(ConfigError, match=r"training\.grpo_learning_rate: must be between 1e-07 and 0.01"):
        config.loads('[training]\nmethod = "sft+grpo"\ngrpo_learning_rate = 0.5\n[evaluation]\nguard_command = ["g"]\n')
    with pytest.raises(ConfigError, match=r"training\.num_generations: must divide"):
        config.loads('[training]\nmethod = "sft+grpo"\nbatch_size = 6\n[evaluation]\nguard_command = ["g"]\n')


def test_grpo_with_a_guard_command_loads():
    s = config.loads(
        '[training]\nmethod = "grpo"\nbatch_size = 8\nnum_generations = 4\n'
        '[evaluation]\nguard_command = ["python3", "guard.py"]\n'
    )
    assert (s.training.method, s.training.num_generations, s.training.beta) == ("grpo", 4, 0.0)


def test_grpo_batch_that_splits_a_group_of_completions_names_num_generations():
    with pytest.raises(ConfigError, match=r"training\.num_generations: must divide batch_size \* grad_accum"):
        config.loads(
            '[training]\nmethod = "grpo"\nbatch_size = 6\nnum_generations = 4\n'
            '[evaluation]\nguard_command = ["guard"]\n'
        )
    with pytest.raises(ConfigError, match=r"training\.num_generations: must be at least 2, got 1"):
        config.loads("[training]\nnum_generations = 1\n")


def test_liger_kernel_true_without_the_package_is_refused_with_the_reason():
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(ConfigError, match="training.liger_kernel: true needs the liger-kernel package"):
        config.loads("[training]\nliger_kernel = true")
    assert config.loads("[training]\nliger_kernel = false\npacking = false").training.packing is False


def test_ray_launcher_keys_are_checked_at_load_with_the_key_path(tmp_path, monkeypatch):
    """launcher = "ray" (docs/training.md, "More than one machine"): bad values name their key."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "ray" else real_find_spec(name, *a)
    )
    ok = config.loads('[training]\nlauncher = "ray"\nray_workers = 4\nray_address = "10.0.0.5:6379"\n').training
    assert (ok.launcher, ok.ray_workers, ok.ray_address) == ("ray", 4, "10.0.0.5:6379")
    assert config.loads('[training]\nlauncher = "ray"\nray_address = "auto"\n').training.ray_address == "auto"
    bad = [
        ('launcher = "slurm"', r"training.launcher: must be one of"),
        ('launcher = "ray"\nray_workers = 0', r"training.ray_workers: must be at least 1, got 0"),
        ('launcher = "ray"\nray_cpus_per_worker = 0', r"training.ray_cpus_per_worker: must be positive"),
        ('launcher = "ray"\nray_gpus_per_worker = 2', r"training.ray_gpus_per_worker: must be 0 \(CPU workers"),
        ('launcher = "ray"\nray_address = "head-node"', r"training.ray_address: must be \"\""),
        ('launcher = "ray"\nray_address = "h:99999"', r"training.ray_address: must be \"\""),
        ('launcher = "ray"\nprocesses = 2', r"training.processes: applies to launcher = \"local\" only"),
        ("ray_workers = 2", r"training.ray_workers: applies to launcher = \"ray\" only"),
    ]
    for lines, message in bad:
        with pytest.raises(ConfigError, match=message):
            config.loads(f"[training]\n{lines}\n")
    # Without ray in this Python: refused at load, saying how to install it.
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"training.launcher: \"ray\" .* ray is not installed .*lorad\[ray\]"):
        config.loads('[training]\nlauncher = "ray"\n')
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[training]\nlauncher = "ray"\nray_workers = 0\n')
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(cfg), "ingest"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EX_CONFIG == 78
    assert "training.ray_workers: must be at least 1, got 0" in proc.stderr
