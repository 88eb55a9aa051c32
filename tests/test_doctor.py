"""A native crash is explained, not just counted: by ``voicebus doctor`` and by the supervisor that gave up.

The crashes are real: child processes that read address 0 and die by SIGSEGV,
as llama.cpp does on a CPU it was not built for. This machine has no AMX, so
the CPU report is faked where the message depends on it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from voicebus.cli.main import cli
from voicebus.engine.bus import free_port_pair
from voicebus.engine.restart_policy import RestartPolicy
from voicebus.engine.spawner import WorkerSpec
from voicebus.engine.supervisor import Slot, _exit_reason
from voicebus.workers.llm.cpu import CpuReport
from voicebus.workers.llm.models import find_smollm2_gguf
from voicebus.workers.llm.probe import GenerationProbe

SEGFAULT = (sys.executable, "-c", "import ctypes; ctypes.string_at(0)")
"""A child that dies the way a native crash does: the kernel's SIGSEGV, no Python handler."""
SAPPHIRE_RAPIDS = CpuReport(
    flags=frozenset({"avx2", "avx512f", "avx512bw", "amx_tile", "amx_int8", "amx_bf16"}),
    system_info="CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | ",
)


# --- the probe: a short generation in a child process ---------------------------------------


def test_a_segfaulting_child_is_one_line_naming_signal_cpu_and_build() -> None:
    result = GenerationProbe(SEGFAULT, cpu=SAPPHIRE_RAPIDS).run(find_smollm2_gguf(), repack="on")
    assert not result.ok and result.signal == "SIGSEGV"
    assert "\n" not in result.detail
    for needle in ("llama.cpp crashed (SIGSEGV)", "SmolLM2", "AVX2 yes", "AVX-512 yes", "AMX yes",
                   "llama-cpp-python", "AMX_INT8 = 1", "VOICEBUS_LLM_REPACK=off"):
        assert needle in result.detail, needle


def test_a_crash_with_repacking_already_off_points_at_a_generic_build() -> None:
    result = GenerationProbe(SEGFAULT, cpu=SAPPHIRE_RAPIDS).run(find_smollm2_gguf(), repack="off")
    assert result.signal == "SIGSEGV"
    assert "-DGGML_NATIVE=OFF" in result.detail and "VOICEBUS_LLM_REPACK" not in result.detail


def test_a_hung_child_is_killed_at_the_deadline() -> None:
    started = time.monotonic()
    result = GenerationProbe((sys.executable, "-c", "import time; time.sleep(60)"), timeout_s=1).run("m.gguf")
    assert time.monotonic() - started < 10
    assert not result.ok and "no answer within 1 s" in result.detail


def test_a_model_that_fails_to_load_is_reported_by_the_real_child(tmp_path: Path) -> None:
    result = GenerationProbe().run(tmp_path / "absent.gguf")
    assert not result.ok and not result.signal
    assert "ModelError" in result.detail and "absent.gguf" in result.detail


# --- voicebus doctor ------------------------------------------------------------------------


def run_doctor(tmp_path: Path, probe: GenerationProbe | None, **settings: str) -> tuple[int, list[str]]:
    """``voicebus doctor`` in process with the embedded defaults and ``settings`` (environment variables);
    (exit code, output lines)."""
    env: dict[str, str | None] = {name: None for name in os.environ if name.startswith("VOICEBUS_")}
    env["VOICEBUS_STATE_DIR"] = str(tmp_path)
    env.update(settings)
    result = CliRunner().invoke(cli, ["doctor"], obj=probe, env=env)
    assert "Traceback" not in result.output
    return result.exit_code, result.output.splitlines()


def test_doctor_reports_a_crashing_model_as_one_failed_check(tmp_path: Path) -> None:
    code, lines = run_doctor(tmp_path, GenerationProbe(SEGFAULT))
    assert code == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1, lines
    assert failed[0].startswith("FAIL llm   generate   local: llama.cpp crashed (SIGSEGV)")
    assert "AVX2" in failed[0] and "AVX-512" in failed[0] and "AMX" in failed[0] and "build:" in failed[0]
    assert any(line.startswith("ok   tts") for line in lines), "doctor went on after the crash"


def test_doctor_fails_a_listener_setting_that_voicebus_up_would_refuse(tmp_path: Path) -> None:
    """Found trying voicebus as a new user: doctor said all was well where up could not start."""
    code, lines = run_doctor(tmp_path, GenerationProbe(SEGFAULT), VOICEBUS_VAD_ENGINE="foo")
    assert code == 1
    assert "FAIL asr   settings   whisper: unknown VAD engine 'foo'; choose from silero, webrtc" in lines, lines


@pytest.mark.slow
def test_doctor_runs_the_real_model_in_a_child(tmp_path: Path) -> None:
    code, lines = run_doctor(tmp_path, None)
    assert code == 0, lines
    generate = next(line for line in lines if "generate" in line)
    assert generate.startswith("ok   llm   generate   local: ") and "tokens in" in generate
    assert "weight repacking" in generate


# --- the supervisor: a worker killed by a signal while loading -------------------------------


CRASHING_THINKER = """\
import sys
# Python imports this module at start-up (site.py) when its folder is on PYTHONPATH: in the thinker
# only, the chat model's loader becomes a real segfault, as llama.cpp's is on a CPU it was not built for.
if sys.orig_argv[-2:] == ["worker", "thinker"]:
    import ctypes
    import voicebus.workers.backends as backends

    def open_chat(settings, **options):
        ctypes.string_at(0)

    backends.open_chat = open_chat
"""


@pytest.mark.slow
def test_voicebus_up_says_the_thinker_crashed_loading_its_chat_model(launcher, tmp_path: Path) -> None:
    """The issue's own case end to end: the real ``voicebus up`` and thinker; only the loader segfaults."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASHING_THINKER)
    up = launcher.up("--input", "none", "--output", "none", "--only", "thinker", "--start-bus",
                     "--bus", f"tcp://127.0.0.1:{free_port_pair()}", "--insecure",
                     PYTHONPATH=str(site), VOICEBUS_SUPERVISOR_MAX_RESTARTS="1")
    assert up.wait(60) == 1, up.stderr()[-3000:]
    stderr = up.stderr()
    assert "thinker killed by SIGSEGV while loading its backends (llm=local); restarting in" in stderr
    last = stderr[stderr.rindex("voicebus: gave up"):].splitlines()[0]
    assert last == ("voicebus: gave up on thinker: killed by SIGSEGV while loading its backends (llm=local); "
                    "run 'voicebus doctor' to check them; last error:")
    assert "Traceback" not in stderr


def test_a_ready_worker_killed_by_a_signal_gets_no_loading_note() -> None:
    """The note is for crashes before ready only; a running worker's crash reads as before."""
    slot = Slot(WorkerSpec("thinker", ["true"]), RestartPolicy())
    slot.backends = {"llm": "local"}
    slot.state = "ready"
    assert _exit_reason(slot, -11, "SIGSEGV") == "killed by SIGSEGV"
    slot.state = "loading"
    assert _exit_reason(slot, -11, "SIGSEGV") == "killed by SIGSEGV while loading its backends (llm=local)"
    assert _exit_reason(slot, 2, "") == "exit code 2"
    slot.backends = {}
    slot.state = "starting"
    assert _exit_reason(slot, -9, "SIGKILL") == "killed by SIGKILL while starting"
