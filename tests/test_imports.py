"""Importing every kuas module does no file I/O, probes no device and starts no threads."""

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys, threading
import numpy, PIL.Image, safetensors, tokenizers, torch, tqdm  # third-party imports are not kuas' doing

opened = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        path = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if not path.endswith((".py", ".pyc", ".so", ".pth")) and "__pycache__" not in path:
            opened.append(path)
sys.addaudithook(hook)

def probe(*a, **k):
    raise AssertionError("device probed at import time")
for name in ("is_available", "device_count", "get_device_properties", "current_device", "init"):
    setattr(torch.cuda, name, probe)

threads = threading.active_count()
import kuas
names = [m.name for m in pkgutil.walk_packages(kuas.__path__, "kuas.") if m.name != "kuas.__main__"]
for name in names:
    importlib.import_module(name)
assert threading.active_count() == threads, f"threads started: {threading.enumerate()}"
opened = [p for p in opened if not p.endswith("/")]  # directory listings of the import system
assert not opened, f"files opened at import: {opened}"
print(len(names))
"""


def test_importing_every_module_has_no_side_effects():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split()[-1]) > 30  # it really imported the package's modules
