"""The torch-free job directory API the daemon and the cycle use."""

from __future__ import annotations

import json
import sys

import pytest
from training_helpers import make_spec

from lorad import config
from lorad.training import jobdir as jobfile
from lorad.training.jobdir import JobError, Result


def test_job_spec_round_trips_through_job_json(tmp_path):
    spec = make_spec(
        job_id="j1",
        base_model="/m",
        state_dir="/s",
        method="dpo",
        target_modules=("q_proj", "v_proj"),
        guard_command=("python", "guard.py"),
        parent_adapter="/a/v0001",
        reference_adapter="/a/v0001",
        window_end=123.5,
    )
    job_dir = jobfile.write_job(tmp_path / "j1", spec, [{"prompt": []}], [{"prompt": [], "x": 1}])
    assert jobfile.read_job(job_dir) == spec
    assert jobfile.read_jsonl(job_dir / "train.jsonl") == [{"prompt": []}]
    assert jobfile.read_jsonl(job_dir / "heldout.jsonl") == [{"prompt": [], "x": 1}]


def test_read_job_names_the_file_when_missing_or_unknown_keys(tmp_path):
    with pytest.raises(JobError, match="no such job file"):
        jobfile.read_job(tmp_path)
    spec = make_spec().as_dict()
    (tmp_path / "job.json").write_text(json.dumps(spec | {"bogus": 1}))
    with pytest.raises(JobError, match=r"job.json: unknown keys \['bogus'\]"):
        jobfile.read_job(tmp_path)
    del spec["lora_r"]
    (tmp_path / "job.json").write_text(json.dumps(spec))
    with pytest.raises(JobError, match=r"missing keys \['lora_r'\]"):
        jobfile.read_job(tmp_path)


def test_job_and_result_files_of_another_schema_version_are_refused_with_the_reason(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps(make_spec().as_dict() | {"schema_version": 1}))
    expected = f"job.json: schema version 1, this lorad reads version {jobfile.SCHEMA_VERSION}"
    with pytest.raises(JobError, match=expected):
        jobfile.read_job(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"job_id": "j", "status": "succeeded"}))
    with pytest.raises(JobError, match="result.json: schema version None"):
        jobfile.read_result(tmp_path)
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(JobError, match="not valid JSON"):
        jobfile.read_result(tmp_path)


def test_result_round_trips_through_result_json(tmp_path):
    result = Result(
        job_id="j", status="succeeded", steps=3, metrics={"candidate": {"nll": 0.5}}, health={"ok": True, "reason": ""}
    )
    jobfile.write_result(tmp_path, result)
    assert jobfile.read_result(tmp_path) == result and result.succeeded


def test_iter_progress_leaves_a_partial_last_line_for_the_next_read(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step"')
    records = list(jobfile.iter_progress(tmp_path))
    assert [r["step"] for r, _ in records] == [1, 2]
    offset = records[-1][1]
    with open(path, "a") as f:
        f.write(": 3}\n")
    assert [r["step"] for r, _ in jobfile.iter_progress(tmp_path, offset)] == [3]
    assert jobfile.last_progress(tmp_path) == {"step": 3}
    assert jobfile.read_result(tmp_path) is None


def test_worker_command_is_a_plain_module_run_for_one_process(tmp_path):
    spec = make_spec()
    assert jobfile.worker_command(tmp_path, spec) == [sys.executable, "-m", "lorad.training.worker", str(tmp_path)]


def test_worker_command_goes_through_accelerate_launch_for_several_processes(tmp_path):
    spec = make_spec(processes=2)
    assert jobfile.worker_command(tmp_path, spec) == [
        sys.executable,
        "-m",
        "lorad.training.worker",
        "--launch",
        str(tmp_path),
    ]
    argv = jobfile.launch_command(tmp_path, spec)
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[-3:] == ["-m", "lorad.training.worker", str(tmp_path)]
    with_config = jobfile.launch_command(tmp_path, make_spec(processes=4, accelerate_config="/etc/ddp.yaml"))
    assert with_config[with_config.index("--config_file") + 1] == "/etc/ddp.yaml"
    assert "--multi_gpu" not in with_config
    # A port of its own, config file or not: jobs on one host never meet on the default 29500.
    assert int(argv[argv.index("--main_process_port") + 1]) > 0
    assert int(with_config[with_config.index("--main_process_port") + 1]) > 0


def test_build_spec_takes_training_and_evaluation_keys():
    settings = config.loads(
        '[training]\nlora_r = 8\nwarm_start = false\nmethod = "kto"\n'
        '[evaluation]\nguard_command = "python guard.py"\nmax_new_tokens = 64\n'
    )
    spec = jobfile.build_spec(
        "j9",
        settings.state_dir,
        settings.training,
        settings.evaluation,
        parent_adapter="/a/current",
        reference_adapter="/a/current",
    )
    assert (spec.lora_r, spec.method, spec.max_new_tokens) == (8, "kto", 64)
    assert spec.guard_command == ("python", "guard.py")
    assert spec.parent_adapter is None  # warm_start = false: a fresh adapter on the base
    assert spec.reference_adapter == "/a/current"
    assert spec.state_dir == str(settings.state_dir)


def test_training_modules_the_daemon_imports_do_not_import_torch():
    import subprocess

    code = "import sys, lorad.training.jobdir, lorad.commands.doctor; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
