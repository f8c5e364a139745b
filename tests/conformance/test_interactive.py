"""Code typed at an interactive prompt runs in workers.

An interactive ``__main__`` has no file a worker could import, which is
what breaks the stdlib's spawn and forkserver start methods; futurepool
ships such functions by value. The session is a real ``python -i`` reading
its input from a pipe.
"""

import os
import subprocess
import sys

SESSION = """\
import futurepool
def double(x):
    return 2 * x

offset = 40
add_offset = lambda x: x + offset
class Box:
    def __init__(self, value):
        self.value = value

ex = futurepool.Executor(max_workers=2)
print("double", ex.submit(double, 21).result(timeout=30))
print("lambda", ex.submit(add_offset, 2).result(timeout=30))
print("class", ex.submit(lambda b: b.value, Box(42)).result(timeout=30))
print("chain", ex.submit(double, ex.submit(add_offset, 1)).result(timeout=30))
ex.shutdown()
"""


def test_functions_typed_at_the_prompt_run_in_workers():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-i", "-q"], input=SESSION, capture_output=True,
                          text=True, timeout=120, env=env)
    lines = [line.strip(">. ") for line in done.stdout.splitlines()]
    assert "double 42" in lines, done.stdout + done.stderr
    assert "lambda 42" in lines, done.stdout + done.stderr
    assert "class 42" in lines, done.stdout + done.stderr
    assert "chain 82" in lines, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
