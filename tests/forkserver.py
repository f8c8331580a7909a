"""Run ``litplug`` and ``python`` command lines as a user types them, without paying the import of
torch, Lightning and litplug for each one.

One server process per test session imports those packages once and does nothing else; for each
command it forks a child, which takes the command's working directory, environment and
``sys.argv``, runs it as the real program would (the ``litplug`` console script, ``python
script.py``, ``python -c``, ``python -m``) and exits with its status. The children start from a
clean interpreter (the server runs no test code), so a command sees what it would see in a new
process, with the imports already done. Commands that start processes of their own (Lightning's
``ddp`` launcher re-runs ``sys.executable`` with ``sys.argv``) start them as usual.

    result = run_command(["litplug", "fit", "--config", "a.yaml"], cwd=tmp_path)
    assert result.returncode == 0, result.output
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_server: subprocess.Popen | None = None


@dataclass
class Result:
    returncode: int
    output: str  # stdout and stderr, interleaved as written


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        _server = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1
        )
        atexit.register(_server.kill)
        line = _server.stdout.readline()
        assert line.strip() == "ready", f"the fork server did not start: {line!r}"
    return _server


def _readline(server: subprocess.Popen, deadline: float) -> str | None:
    left = deadline - time.monotonic()
    if left > 0 and select.select([server.stdout], [], [], left)[0]:
        return server.stdout.readline()
    return None


def run_command(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Result:
    """Run ``argv`` (``litplug ...``, ``python file.py ...``, ``python -c ...``, ``python -m ...``)
    in ``cwd`` with ``env`` (default: this process's environment) in a forked child of the server."""
    server = _start()
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        request = {
            "argv": list(argv),
            "cwd": str(cwd),
            "env": dict(os.environ if env is None else env),
            "log": log.name,
        }
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        deadline = time.monotonic() + timeout
        pid = int(_readline(server, deadline) or 0)
        if not pid:  # the server itself did not answer: start a new one for the next command
            server.kill()
            return Result(124, f"[the fork server gave no child within {timeout} s]")
        done = _readline(server, deadline)
        if done is None:  # the command ran past its time: end it and its process group
            os.killpg(pid, signal.SIGKILL)
            _readline(server, time.monotonic() + 30)
            return Result(124, log.read() + f"\n[timed out after {timeout} s]")
        return Result(int(done), log.read())


def _run_child(request: dict) -> int:
    """In the forked child: become the command and return its exit status."""
    import runpy
    import traceback

    os.setpgid(0, 0)
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in os.environ:  # read at start-up by a new process; the server started with its own
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    argv = request["argv"]
    try:
        if argv[0] == "litplug":
            from litplug.cli import main

            script = Path(sys.executable).with_name("litplug")  # what the console script's argv[0] is
            sys.argv = [str(script) if script.exists() else "litplug", *argv[1:]]
            main()
        elif argv[0] in ("python", "python3") and argv[1] == "-c":
            sys.argv = ["-c", *argv[3:]]
            sys.path.insert(0, "")
            exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif argv[0] in ("python", "python3") and argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        elif argv[0] in ("python", "python3"):
            script = os.path.abspath(argv[1])
            sys.argv = [script, *argv[2:]]
            sys.path.insert(0, os.path.dirname(script))
            runpy.run_path(script, run_name="__main__")
        else:
            raise ValueError(f"not a litplug or python command: {argv}")
        code = 0
    except SystemExit as exit:
        code = exit.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # as the interpreter does when a program ends
    return code


def _serve() -> None:
    import lightning.pytorch  # noqa: F401  (the imports every command would pay for)
    import torch  # noqa: F401

    import litplug.callbacks  # noqa: F401
    import litplug.cli  # noqa: F401
    import litplug.datamodules  # noqa: F401
    import litplug.modules  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_child(request)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if 0 <= code < 256 else 1)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    _serve()
