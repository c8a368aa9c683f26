"""A warm interpreter that runs the project's scripts for the tests (`conftest.run_script`): it imports torch,
transformers and the project once, then forks a child per run, which executes `python SCRIPT ARGS...` as a user's
command would (a fresh `__main__`, its own process, exit status, stdout and stderr), without ~5 s of imports each
time. Most of the suite is such runs, so this is most of its time on a 2-core machine.

Started by conftest with `script_env()` (one thread, no GPU, offline), so the children see exactly the environment a
plain `subprocess.run` of the script would. Protocol, one JSON object per line: request {"argv": [...], "stdout":
path, "stderr": path} on stdin; replies {"pid": child pid}, then {"returncode": rc} on stdout.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback


def warm_up(root: str) -> None:
    """Import what the scripts import (the heavy part of their start-up)."""
    sys.path.insert(0, root)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import tyro  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401

    import kernels  # noqa: F401
    from common import checkpoint, data, dist, generation, models, rewards, tracking, training  # noqa: F401


def run_child(argv: list[str], stdout: str, stderr: str) -> None:
    """In the forked child: become `python argv[0] argv[1:]` and never return."""
    code = 1
    try:
        out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # not the server's request pipe
        os.close(devnull)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter does: None -> 0, an int as is, anything else printed -> 1
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())  # the script's own hook (e.g. one-line data errors), else a traceback
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    warm_up(sys.argv[1])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request["argv"], request["stdout"], request["stderr"])
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
