#!/usr/bin/env python3
"""Misuse probe: what a new user meets at the edges of train_moex.py, moex-timm-train and the Python API.

Tries misuse, bad input, faults and interruption the way a new user would, on the CPU, and sorts each outcome:

- ``good``: an expected error exits non-zero with exactly one line ``<prog>: ...`` on stderr that names the bad
  value, without a traceback (for the Python API: an exception of a sensible type whose first line names the
  argument); or a success where success is right and what it recorded is true;
- ``traceback``: a Python traceback for a user error (for the API: an internal error such as AttributeError, or
  any exception where success was right);
- ``silent``: a success, a wrong result or a wrong record where an error or another result was expected (the
  worst kind);
- ``unclear``: an error line that does not name the bad value (each case lists the substrings that must
  appear), several lines, another exit code than the README's, or a refusal where success was right;
- ``data_lost``: a file of the run folder that existed before is gone or half-written;
- ``hang``: no exit before the case's timeout.
A case that cannot run here (no timm ``train.py``, no ``setpriv``, the base run failed) is ``skipped``.

Families: (a) train_moex.py's command line and configuration, (b) run folders and resume, (c) checkpoints and
weights, (d) datasets, (e) the Python API, in one worker process, (f) ``moex-timm-train``
(``python -m timm_moex.train.timm_train``; timm's ``train.py`` is named by $TIMM_TRAIN_PY, the family is skipped
without it), (g) signals and ``accelerate launch -q``. Most cases fail in the configuration check before any
training; the others train for an epoch or two on 32 images (scikit-learn's digits, offline, or an ImageFolder
generated in a temporary folder). Not run by CI: about 20 minutes on 2 CPU cores.

    python benchmarks/misuse_probe.py --out probe.md          # every case; the report as markdown
    python benchmarks/misuse_probe.py --family a,e --jobs 2
    python benchmarks/misuse_probe.py --only 'b-resume-*'     # ids, comma-separated, shell-style patterns
    python benchmarks/misuse_probe.py --list
"""
import argparse
import csv
import fnmatch
import json
import os
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / 'train_moex.py'
TIMM_TRAIN_ENV = 'TIMM_TRAIN_PY'

OUTCOMES = ('good', 'traceback', 'silent', 'unclear', 'data_lost', 'hang')
SKIPPED = 'skipped'
FAMILIES = {
    'a': 'train_moex.py command line and configuration',
    'b': 'run folders and resume',
    'c': 'checkpoints and weights',
    'd': 'datasets',
    'e': 'Python API',
    'f': 'moex-timm-train',
    'g': 'signals and accelerate launch -q',
}
TRACEBACK = 'Traceback (most recent call last)'
# An API error of one of these types is expected; a bug type is a traceback whatever it says.
API_TYPES = ('ValueError', 'TypeError', 'IndexError', 'RuntimeError')
API_BUG_TYPES = ('AttributeError', 'NameError', 'UnboundLocalError', 'KeyError', 'AssertionError', 'ZeroDivisionError',
                 'RecursionError', 'UnicodeDecodeError', 'ImportError', 'ModuleNotFoundError', 'StopIteration')
# The lines `accelerate launch` prints about its own defaults: the launcher's, not the program's.
ACCELERATE_NOTICE = (r'^The following values were not passed to `accelerate launch`', r'^\t`--',
                     r'^To avoid this warning pass in values')
EXIT = dict(config=2, busy=4, mismatch=5, checkpoint=6, data=7, diverged=8, sigint=130, sigterm=143)

# A tiny training run: digits, 32 images, one epoch; a case's own keys replace these.
FAST = dict(dataset='digits', model='resnet10t', epochs='1', train_limit='32', eval_limit='16', workers='0',
            progress='false', batch_size='16', output_dir='{tmp}/myrun')
RUN = '{tmp}/myrun'  # the run folder of a case (a copy of the base run for the cases that need one)
IMAGES = ['--dataset', 'imagefolder', '--data-dir', '{tmp}/data', '--img-size', '32']
CLASSES = ('ant', 'bee')


# ---------------------------------------------------------------------------------------------
# Cases and outcomes
@dataclass
class Case:
    """One thing a user might do, and what should come of it.

    Args:
        id: Unique; its first letter is the family.
        what: One line for the report (for the API: the call).
        cmd: The command, with placeholders ({python}, {train}, {tmp}, {fx}, {timm_train}, {root}).
        prog: The program name that starts the one-line error.
        expect: 'error', 'ok' or 'either' (an error that names ``names``, or a success that passes ``check``).
        names: Substrings the error line must hold ('-' and '_' alike, any case).
        codes: The exit codes the README gives for this error; empty: any non-zero code.
        setup: ``setup(tmp, fx)`` before the run; may return a callable that cleans up after it.
        check: ``check(tmp, run)`` after a success: None when what it recorded is true, else the problem (a
            silent wrong result), or an (outcome, note) pair.
        check_error: The same after an expected error (a record rewritten by a run that failed, say).
        needs: 'run' (a copy of the base run in {tmp}/myrun), 'weights', 'timm' ($TIMM_TRAIN_PY), 'setpriv'.
        watch: Compare {tmp}/myrun before and after the run for lost or half-written files.
        env: Environment changes; None removes a variable.
        timeout: Seconds before the case is a hang.
        ignore: Regular expressions of stderr lines that are the launcher's, not the program's.
        api: For family e: the call, run in the API worker; its return value goes to ``check(value)``.
        types: The sensible exception types of an API error.
        runner: ``runner(case, tmp, fx)`` for a case of several steps (signals); returns its outcome.
    """
    id: str
    what: str
    cmd: Sequence[str] = ()
    prog: str = 'train_moex.py'
    expect: str = 'error'
    names: Sequence[str] = ()
    codes: Sequence[int] = ()
    setup: Optional[Callable] = None
    check: Optional[Callable] = None
    check_error: Optional[Callable] = None
    needs: Sequence[str] = ()
    watch: bool = False
    env: Dict[str, Optional[str]] = field(default_factory=dict)
    timeout: float = 240.0
    ignore: Sequence[str] = ()
    api: Optional[Callable] = None
    types: Sequence[str] = API_TYPES
    runner: Optional[Callable] = None

    @property
    def family(self) -> str:
        return self.id[0]


@dataclass
class Run:
    """A finished (or killed) command."""
    cmd: List[str]
    rc: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


@dataclass
class Result:
    """A case's outcome, for the table and the report."""
    id: str
    outcome: str
    note: str = ''
    cmd: str = ''
    last_line: str = ''
    seconds: float = 0.0

    @property
    def family(self) -> str:
        return self.id[0]


def _norm(text: str) -> str:
    return text.lower().replace('-', '_')


def missing_names(line: str, names: Sequence[str]) -> List[str]:
    """The ``names`` that ``line`` does not hold ('-' and '_' alike, any case)."""
    return [n for n in names if _norm(n) not in _norm(line)]


def classify(expect: str, names: Sequence[str], prog: str, rc: Optional[int], stderr: str, stdout: str = '',
             timed_out: bool = False, lost: Sequence[str] = (), problem: Any = None, codes: Sequence[int] = (),
             ignore: Sequence[str] = ()) -> Tuple[str, str]:
    """The outcome of a command and why.

    Args:
        expect: 'error', 'ok' or 'either'.
        names: Substrings the error line must hold.
        prog: The program name the error line starts with (``<prog>: ...``).
        rc: The exit code (None when killed at the timeout; -N when killed by signal N, which a shell shows as
            128 + N).
        stderr: What the command wrote on stderr.
        stdout: What it wrote on stdout (searched for a traceback too).
        timed_out: Whether it ran past its timeout.
        lost: Files of the run folder that are gone or half-written.
        problem: What the case's check found wrong in what was recorded (a string: a silent wrong result), or
            an (outcome, note) pair; None when nothing.
        codes: The exit codes the README gives for this error; empty: any non-zero code.
        ignore: Regular expressions of stderr lines to leave out (a launcher's notices).

    Returns:
        (outcome, note): one of ``OUTCOMES`` and a short reason ('' for good).
    """
    if timed_out:
        return 'hang', 'no exit before the timeout'
    if lost:
        return 'data_lost', '; '.join(lost)
    if isinstance(problem, tuple):
        return problem
    text = stderr + '\n' + stdout
    if TRACEBACK in text:
        tail = [ln for ln in stderr.splitlines() if ln.strip()] or [ln for ln in stdout.splitlines() if ln.strip()]
        return 'traceback', tail[-1].strip()[:200] if tail else 'a traceback'
    if rc == 0:
        if expect == 'error':
            return 'silent', problem or 'exit 0 where an error was expected'
        if problem:
            return 'silent', problem
        return 'good', ''
    if problem and expect != 'ok':
        return 'silent', problem
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not any(re.search(p, ln) for p in ignore)]
    if expect == 'ok':
        return 'unclear', f'refused where success was expected (exit {rc}): ' + (lines[-1][:160] if lines else
                                                                                 'nothing on stderr')
    if not lines:
        return 'unclear', f'exit {rc} with nothing on stderr'
    own = [ln for ln in lines if ln.startswith(f'{prog}: ')]
    if len(lines) > 1 or not own:
        other = next((ln for ln in lines if not ln.startswith(f'{prog}: ')), lines[0])
        return 'unclear', (f'{len(lines)} lines on stderr, not one "{prog}: ..." line; first other: '
                           f'{other.strip()[:120]}')
    missing = missing_names(own[0], names)
    if missing:
        return 'unclear', f'the line does not name {", ".join(repr(m) for m in missing)}'
    status = 128 - rc if rc is not None and rc < 0 else rc  # killed by signal N: the shell's $? is 128 + N
    if codes and status not in codes:
        return 'unclear', f'exit code {status}, the README says {" or ".join(map(str, codes))}'
    return 'good', ''


def classify_api(expect: str, names: Sequence[str], exc_type: Optional[str], message: str = '',
                 problem: Any = None, timed_out: bool = False, types: Sequence[str] = API_TYPES) -> Tuple[str, str]:
    """The outcome of a Python API call and why.

    Args:
        expect: 'error', 'ok' or 'either'.
        names: Substrings the exception's first line must hold.
        exc_type: The name of the exception's type; None when the call returned.
        message: ``str(exception)``.
        problem: What the case's check found wrong in the returned value (a NaN, say), or an (outcome, note) pair.
        timed_out: Whether the call ran past its timeout.
        types: The sensible exception types.

    Returns:
        (outcome, note).
    """
    if timed_out:
        return 'hang', 'no return before the timeout'
    if exc_type is None:
        if isinstance(problem, tuple):
            return problem
        if problem:
            return 'silent', problem
        if expect == 'error':
            return 'silent', 'returned where an exception was expected'
        return 'good', ''
    first = (message.strip().splitlines() or [''])[0]
    said = f'{exc_type}: {first}'[:200]
    if expect == 'ok' or exc_type in API_BUG_TYPES:
        return 'traceback', said
    missing = missing_names(first, names)
    if missing:
        return 'unclear', f'does not name {", ".join(repr(m) for m in missing)}: {said}'
    if exc_type not in types:
        return 'unclear', f'{exc_type} is not one of {", ".join(types)}: {said}'
    return 'good', ''


# ---------------------------------------------------------------------------------------------
# Running commands
def _env(changes: Dict[str, Optional[str]]) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1',
               HF_HUB_DISABLE_TELEMETRY='1', PYTHONDONTWRITEBYTECODE='1')
    env.pop('TIMM_MOEX_DEBUG', None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def execute(cmd: List[str], cwd: Path, env: Dict[str, str], timeout: float) -> Run:
    """Run ``cmd`` in its own process group; kill the group after ``timeout`` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors='replace', start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        timed_out = True
    return Run(cmd, None if timed_out else proc.returncode, out, err, timed_out, time.perf_counter() - start)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def substitute(cmd: Sequence[str], tmp: Path, fx: 'Fixtures') -> List[str]:
    values = {'{python}': sys.executable, '{train}': str(TRAIN), '{tmp}': str(tmp), '{fx}': str(fx.root),
              '{timm_train}': fx.timm_train or '', '{root}': str(ROOT)}
    out = []
    for arg in cmd:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def display(case: Case) -> str:
    """The case's command as a user would type it in the case's folder (where it runs), the shared files in $FX."""
    values = {'{python}': 'python', '{train}': 'train_moex.py', '{tmp}/': '', '{tmp}': '.', '{fx}': '$FX',
              '{timm_train}': f'${TIMM_TRAIN_ENV}', '{root}': '.'}
    parts = []
    for arg in case.cmd:
        for key, value in values.items():
            arg = arg.replace(key, value)
        if arg == _HOOK_NORM:
            arg = '<moex-timm-train, printing the norm of the hook that ran>'
        parts.append(arg if re.fullmatch(r'[\w@%+=:,./$-]+', arg) else shlex.quote(arg))
    env = ' '.join(f'{k}={v.replace("{tmp}/", "")}' for k, v in case.env.items() if v is not None)
    unset = ' '.join(f'-u {k}' for k, v in case.env.items() if v is None)
    return (f'env {unset} ' if unset else '') + (env + ' ' if env else '') + ' '.join(parts)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:240] if lines else ''


# ---------------------------------------------------------------------------------------------
# The run folder before and after: lost and half-written files
def _intact(path: Path) -> bool:
    """Whether a file reads as what its name says (json, yaml, csv, safetensors) and is not empty."""
    try:
        if path.stat().st_size == 0:
            return False
        if path.suffix == '.json':
            json.loads(path.read_text())
        elif path.suffix == '.yaml':
            import yaml
            return yaml.safe_load(path.read_text()) is not None
        elif path.suffix == '.csv':
            rows = list(csv.reader(path.read_text().splitlines()))
            return len({len(r) for r in rows}) <= 1
        elif path.suffix == '.safetensors':
            with open(path, 'rb') as f:
                n = int.from_bytes(f.read(8), 'little')
                header = json.loads(f.read(n))
            end = max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
            return path.stat().st_size >= 8 + n + end
        return True
    except Exception:  # noqa: BLE001  any failure to read it back
        return False


def snapshot(folder: Path) -> Dict[str, Tuple[int, bool]]:
    """{relative path: (size, intact)} of every file under ``folder`` but the lock."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, _intact(p)) for p in sorted(folder.rglob('*'))
            if p.is_file() and p.name != '.lock'}


def lost_files(before: Dict[str, Tuple[int, bool]], folder: Path) -> List[str]:
    """The files of ``before`` that are gone, or were intact and are not any more."""
    lost = []
    for rel, (size, intact) in before.items():
        path = folder / rel
        if not path.is_file():
            lost.append(f'{rel} is gone')
        elif intact and not _intact(path):
            lost.append(f'{rel} is half-written ({path.stat().st_size} of {size} bytes before)')
    return lost


# ---------------------------------------------------------------------------------------------
# Fixtures
@dataclass
class Fixtures:
    """What the cases share, made once in a temporary folder.

    Attributes:
        root: The folder ({fx}).
        timm_train: timm's train.py, from $TIMM_TRAIN_PY (None: family f's cases that need it are skipped).
        base_run: A finished 2-epoch run with checkpoint-1 and checkpoint-2 (b-base-run), once it has run.
        base_failed: Why the base run failed, if it did.
    """
    root: Path
    timm_train: Optional[str] = None
    base_run: Optional[Path] = None
    base_failed: str = ''

    @property
    def images(self) -> Path:
        return self.root / 'images'


def make_image_folder(root: Path, per_class: Tuple[int, int] = (8, 4), size: int = 32, seed: int = 0) -> Path:
    """train/<class>/*.png and test/<class>/*.png, classes ``CLASSES``; class k is brighter in channel k."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in zip(('train', 'test'), per_class):
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
                img[..., k] += 100
                Image.fromarray(img).save(folder / f'{i:03d}.png')
    return root


def make_weights(folder: Path) -> None:
    """The weight files of family c: garbage, truncated, of another architecture or class count."""
    import argparse as _argparse

    import timm
    import torch
    from safetensors.torch import save_file

    import timm_moex  # noqa: F401  (registers the package's models)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = timm.create_model('resnet10t', num_classes=10).state_dict()
    (folder / 'garbage.pth').write_bytes(os.urandom(4096))
    torch.save({'state_dict': state}, folder / 'full.pth.tar')
    data = (folder / 'full.pth.tar').read_bytes()
    (folder / 'truncated.pth.tar').write_bytes(data[:len(data) // 2])
    (folder / 'empty.safetensors').write_bytes(b'')
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / 'full.safetensors'))
    data = (folder / 'full.safetensors').read_bytes()
    (folder / 'truncated.safetensors').write_bytes(data[:len(data) // 2])
    torch.save([1, 2, 3], folder / 'list.pth')
    # timm's train.py keeps its argparse Namespace in every checkpoint
    torch.save({'state_dict': state, 'args': _argparse.Namespace(lr=0.1), 'epoch': 1}, folder / 'namespace.pth.tar')
    torch.save(timm.create_model('test_resnet', num_classes=10).state_dict(), folder / 'wrong_arch.pth')
    five = timm.create_model('resnet10t', num_classes=5).state_dict()
    save_file({k: v.contiguous() for k, v in five.items()}, str(folder / 'five_classes.safetensors'))
    torch.save({'state_dict': {f'module.{k}': v for k, v in state.items()}}, folder / 'module_prefix.pth.tar')
    (folder / 'notes.txt').write_text('not weights\n')
    (folder / 'noweights').mkdir(exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Building commands
def _keys(argv: Sequence[str]) -> set:
    return {a[2:].split('=', 1)[0].replace('-', '_') for a in argv if a.startswith('--') and len(a) > 2}


def fast_argv(argv: Sequence[str], yaml_keys: Sequence[str] = ()) -> List[str]:
    """``FAST`` as command-line options, less the keys that ``argv`` (or the case's YAML) sets, then ``argv``."""
    given = _keys(argv) | set(yaml_keys)
    base = [x for k, v in FAST.items() if k not in given for x in (f'--{k.replace("_", "-")}', v)]
    return base + list(argv)


def _write(rel: str, text: str) -> Callable:
    def setup(tmp: Path, fx: Fixtures) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return setup


def _all(*setups: Callable) -> Callable:
    def setup(tmp: Path, fx: Fixtures):
        cleanups = [s(tmp, fx) for s in setups]
        cleanups = [c for c in cleanups if callable(c)]
        return (lambda: [c() for c in cleanups]) if cleanups else None
    return setup


def _images(mutate: Optional[Callable[[Path], None]] = None) -> Callable:
    """Copy the generated ImageFolder to {tmp}/data, then ``mutate(data)``."""
    def setup(tmp: Path, fx: Fixtures) -> None:
        shutil.copytree(fx.images, tmp / 'data')
        if mutate is not None:
            mutate(tmp / 'data')
    return setup


def _yaml_keys(text: str) -> List[str]:
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    return [str(k) for k in data] if isinstance(data, dict) else []


def _read_yaml(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text()) or {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _summary_rows(run: Path) -> int:
    with open(run / 'summary.csv', newline='') as f:
        return len(list(csv.DictReader(f)))


def _expect_files(*rels: str, rows: Optional[int] = None, config: Optional[dict] = None,
                  results: Optional[dict] = None, output: Sequence[str] = ()) -> Callable:
    """A check: files in the run folder, the summary's rows, config.yaml / results.json values, words printed."""
    def check(tmp: Path, run: Run) -> Optional[str]:
        folder = tmp / 'myrun'
        for rel in rels:
            if not (folder / rel).exists():
                return f'{rel} is missing after a run that exited 0'
        if rows is not None and _summary_rows(folder) != rows:
            return f'summary.csv has {_summary_rows(folder)} rows, not {rows}'
        for name, want in (('config.yaml', config), ('results.json', results)):
            if want:
                data = (_read_yaml if name.endswith('yaml') else _read_json)(folder / name)
                for key, value in want.items():
                    if data.get(key) != value:
                        return f'{name} records {key}={data.get(key)!r}, expected {value!r}'
        text = _norm(run.stdout + run.stderr)
        for words in output:
            if not any(_norm(w) in text for w in words.split('|')):
                return f'nothing printed about {words!r}'
        return None
    return check


# ---------------------------------------------------------------------------------------------
# The cases
def build_cases() -> List[Case]:
    """Every case, in family order; ids are unique."""
    cases: List[Case] = []
    cases += _family_a()
    cases += _family_b()
    cases += _family_c()
    cases += _family_d()
    cases += _family_e()
    cases += _family_f()
    cases += _family_g()
    return cases


def _cli(id: str, what: str, argv: Sequence[str], names: Sequence[str] = (), expect: str = 'error',
         codes: Sequence[int] = (), fast: bool = True, yaml_keys: Sequence[str] = (), prefix: Sequence[str] = (),
         **kwargs) -> Case:
    cmd = [*prefix, '{python}', '{train}', *(fast_argv(argv, yaml_keys) if fast else argv)]
    return Case(id, what, cmd, names=names, expect=expect, codes=codes, **kwargs)


def _yaml_case(id: str, what: str, text: str, names: Sequence[str], argv: Sequence[str] = (), file: str = 'c.yaml',
               **kwargs) -> Case:
    return _cli(id, what, ['--config', f'{{tmp}}/{file}', *argv], names, yaml_keys=_yaml_keys(text),
                setup=_write(file, text), **kwargs)


def _family_a() -> List[Case]:
    cfg = (EXIT['config'],)
    cases = [
        _cli('a-unknown-key', 'a key that does not exist', ['--lerning-rate', '0.1'], ['lerning_rate'], codes=cfg),
        _cli('a-typo-moex-key', 'a typo in a moex key', ['--moex-prb', '0.5'], ['moex_prb'], codes=cfg),
        _cli('a-typo-epochs', '--epoch for --epochs', ['--epoch', '1'], ['epoch'], codes=cfg),
        _cli('a-typo-batchsize', '--batchsize for --batch-size', ['--batchsize', '8'], ['batchsize'], codes=cfg),
        _cli('a-positional', 'a bare word: the recipe name without --config', ['quickstart'], ['quickstart'],
             codes=cfg),
        _cli('a-single-dash', 'one dash: -lr 0.1', ['-lr', '0.1'], ['-lr'], codes=cfg),
        _cli('a-missing-value', '--lr at the end without a value', ['--lr'], ['lr'], codes=cfg),
        _cli('a-config-no-value', '--config at the end without a file', ['--config'], ['config'], codes=cfg),
        _cli('a-double-dash', 'a lone --', ['--'], ['--'], codes=cfg),
        _cli('a-equals-syntax', '--lr=0.05 (the = form) trains with lr 0.05', ['--lr=0.05'], expect='ok',
             check=_expect_files('results.json', config=dict(lr=0.05))),
    ]
    bad_values = [  # (id, argv, names)
        ('lr-not-a-number', ['--lr', 'abc'], ['lr', 'abc']),
        ('lr-negative', ['--lr', '-0.1'], ['lr', '-0.1']),
        ('lr-nan', ['--lr', '.nan'], ['lr', 'nan']),
        ('lr-inf', ['--lr', '.inf'], ['lr', 'inf']),
        ('epochs-zero', ['--epochs', '0'], ['epochs', '0']),
        ('epochs-negative', ['--epochs', '-1'], ['epochs', '-1']),
        ('epochs-float', ['--epochs', '1.5'], ['epochs', '1.5']),
        ('epochs-word', ['--epochs', 'ten'], ['epochs', 'ten']),
        ('batch-size-zero', ['--batch-size', '0'], ['batch_size', '0']),
        ('batch-size-negative', ['--batch-size', '-4'], ['batch_size', '-4']),
        ('batch-size-float', ['--batch-size', '2.5'], ['batch_size', '2.5']),
        ('workers-negative', ['--workers', '-1'], ['workers', '-1']),
        ('seed-word', ['--seed', 'abc'], ['seed', 'abc']),
        ('seed-float', ['--seed', '1.5'], ['seed', '1.5']),
        ('moex-not-bool', ['--moex', 'maybe'], ['moex', 'maybe']),
        ('moex-prob-above-one', ['--moex', 'true', '--moex-prob', '1.5'], ['moex_prob', '1.5']),
        ('moex-prob-negative', ['--moex', 'true', '--moex-prob', '-0.1'], ['moex_prob', '-0.1']),
        ('moex-prob-nan', ['--moex', 'true', '--moex-prob', '.nan'], ['moex_prob', 'nan']),
        ('moex-lam-two', ['--moex', 'true', '--moex-lam', '2'], ['moex_lam', '2']),
        ('moex-eps-negative', ['--moex', 'true', '--moex-eps', '-1'], ['moex_eps', '-1']),
        ('moex-eps-word', ['--moex', 'true', '--moex-eps', 'small'], ['moex_eps', 'small']),
        ('moex-norm-unknown', ['--moex', 'true', '--moex-norm', 'bn'], ['moex_norm', 'bn']),
        ('moex-norm-gn0', ['--moex', 'true', '--moex-norm', 'gn0'], ['moex_norm', 'gn0']),
        ('moex-layer-unknown', ['--moex', 'true', '--moex-layer', 'layer9'], ['moex_layer', 'layer9']),
        ('moex-impl-unknown', ['--moex', 'true', '--moex-impl', 'cuda'], ['moex_impl', 'cuda']),
        ('weight-decay-negative', ['--weight-decay', '-1'], ['weight_decay', '-1']),
        ('momentum-negative', ['--momentum', '-0.5'], ['momentum', '-0.5']),
        ('sched-unknown', ['--sched', 'cosin'], ['sched', 'cosin']),
        ('opt-unknown', ['--opt', 'adamx'], ['opt', 'adamx']),
        ('model-typo', ['--model', 'resnet-18'], ['model', 'resnet-18']),
        ('model-unknown', ['--model', 'nonet50'], ['model', 'nonet50']),
        ('mixed-precision-unknown', ['--mixed-precision', 'fp8'], ['mixed_precision', 'fp8']),
        ('dataset-unknown', ['--dataset', 'cifar11'], ['dataset', 'cifar11']),
        ('aug-recipe-unknown', ['--aug-recipe', 'strong'], ['aug_recipe', 'strong']),
        ('loader-unknown', ['--loader', 'gpu'], ['loader', 'gpu']),
        ('loss-unknown', ['--loss', 'focal'], ['loss', 'focal']),
        ('mix-unknown', ['--mix', 'automixx'], ['mix', 'automixx']),
        ('label-noise-above-one', ['--label-noise', '1.5'], ['label_noise', '1.5']),
        ('hflip-two', ['--hflip', '2'], ['hflip', '2']),
        ('smoothing-negative', ['--smoothing', '-0.1'], ['smoothing', '-0.1']),
        ('mixup-negative', ['--mixup', '-1'], ['mixup', '-1']),
        ('cutmix-negative', ['--cutmix', '-1'], ['cutmix', '-1']),
        ('mixup-mode-unknown', ['--mixup-mode', 'pairs'], ['mixup_mode', 'pairs']),
        ('reprob-two', ['--reprob', '2'], ['reprob', '2']),
        ('remode-unknown', ['--remode', 'noise'], ['remode', 'noise']),
        ('mean-two-values', ['--mean', '[0.5,0.5]'], ['mean', '0.5']),
        ('std-zero', ['--std', '[0,1,1]'], ['std', '0']),
        ('std-word', ['--std', 'wide'], ['std', 'wide']),
        ('img-size-zero', ['--img-size', '0'], ['img_size', '0']),
        ('num-classes-zero', ['--num-classes', '0'], ['num_classes', '0']),
        ('eval-batch-size-zero', ['--eval-batch-size', '0'], ['eval_batch_size', '0']),
        ('grad-accum-zero', ['--grad-accum-steps', '0'], ['grad_accum_steps', '0']),
        ('checkpoint-keep-zero', ['--checkpoint-keep', '0'], ['checkpoint_keep', '0']),
        ('warmup-epochs-negative', ['--warmup-epochs', '-1'], ['warmup_epochs', '-1']),
        ('decay-milestones-word', ['--sched', 'multistep', '--decay-milestones', 'later'],
         ['decay_milestones', 'later']),
        ('decay-milestones-words', ['--sched', 'multistep', '--decay-milestones', '[a,b]'], ['decay_milestones']),
        ('model-kwargs-not-mapping', ['--model-kwargs', 'drop_rate'], ['model_kwargs', 'drop_rate']),
        ('model-kwargs-unknown', ['--model-kwargs', '{bogus_arg: 1}'], ['model_kwargs', 'bogus_arg']),
        ('opt-kwargs-unknown', ['--opt-kwargs', '{bogus_arg: 1}'], ['opt_kwargs', 'bogus_arg']),
        ('corruptions-unknown', ['--eval-corruptions', 'fogg'], ['eval_corruptions', 'fogg']),
        ('severities-list-syntax', ['--eval-corruptions', 'fog', '--eval-corruptions-severities', '1,5'],
         ['eval_corruptions_severities', '1,5', '[']),
        ('severities-out-of-range', ['--eval-corruptions', 'fog', '--eval-corruptions-severities', '[0,6]'],
         ['eval_corruptions_severities', '6']),
        ('severities-repeated', ['--eval-corruptions', 'fog', '--eval-corruptions-severities', '[1,1]'],
         ['eval_corruptions_severities']),
        ('corruptions-limit-negative', ['--eval-corruptions', 'fog', '--eval-corruptions-limit', '-1'],
         ['eval_corruptions_limit', '-1']),
        ('auto-augment-unknown', ['--auto-augment', 'rand-foo'], ['auto_augment', 'rand-foo']),
        ('compile-mode-unknown', ['--compile-mode', 'fast'], ['compile_mode', 'fast']),
        ('compile-backend-unknown', ['--compile-backend', 'tvm'], ['compile_backend', 'tvm']),
        ('log-with-unknown', ['--log-with', 'wandb'], ['log_with', 'wandb']),
        ('push-to-hub-bad-id', ['--push-to-hub', 'not a repo!'], ['push_to_hub', 'not a repo!']),
        ('bitempered-t1-two', ['--loss', 'bi_tempered', '--bitempered-t1', '2.0'], ['t1', '2']),
        ('bitempered-iters-zero', ['--loss', 'bi_tempered', '--bitempered-iters', '0'], ['iters', '0']),
        ('snapmix-alpha-zero', ['--snapmix', 'true', '--snapmix-alpha', '0'], ['snapmix_alpha', '0']),
        ('mixstyle-alpha-zero', ['--mixstyle', 'true', '--mixstyle-alpha', '0'], ['mixstyle_alpha', '0']),
        ('model-ema-decay-one', ['--model-ema', 'true', '--model-ema-decay', '1.0'], ['model_ema_decay', '1']),
        ('automix-lam-margin', ['--mix', 'automix', '--automix-lam-margin', '0.6'], ['automix_lam_margin', '0.6']),
        ('resume-not-a-folder', ['--resume', '{tmp}/nockpt'], ['resume', 'nockpt']),
        ('eval-only-no-checkpoint', ['--eval-only', 'true'], ['checkpoint']),
        ('eval-only-missing-checkpoint', ['--eval-only', 'true', '--checkpoint', '{tmp}/nope.safetensors'],
         ['checkpoint', 'nope.safetensors']),
        ('initial-checkpoint-missing', ['--initial-checkpoint', '{tmp}/nope.pth'], ['initial_checkpoint', 'nope.pth']),
    ]
    cases += [_cli(f'a-{id}', f'{" ".join(argv)}', argv, names) for id, argv, names in bad_values]
    cases += [
        _cli('a-push-to-hub-no-token', '--push-to-hub owner/name without a Hugging Face token',
             ['--push-to-hub', 'someone/model'], ['push_to_hub', 'token'], codes=cfg,
             env={'HF_TOKEN': None, 'HUGGING_FACE_HUB_TOKEN': None, 'HF_HOME': '{tmp}/hf'}),
        # conflicting keys
        _cli('a-snapmix-and-mixup', 'SnapMix with Mixup on', ['--snapmix', 'true', '--mixup', '0.2'],
             ['snapmix', 'mixup'], codes=cfg),
        _cli('a-automix-and-cutmix', 'AutoMix with CutMix on', ['--mix', 'automix', '--cutmix', '1.0'],
             ['automix', 'cutmix'], codes=cfg),
        _cli('a-mixup-odd-batch', 'Mixup with an odd batch size', ['--mixup', '0.2', '--batch-size', '15'],
             ['batch_size', '15'], codes=cfg),
        _cli('a-crossdomain-odd-batch', 'MixStyle crossdomain with an odd batch size',
             ['--mixstyle', 'true', '--mixstyle-mix', 'crossdomain', '--batch-size', '15'], ['batch_size', '15'],
             codes=cfg),
        _cli('a-mixstyle-no-layers', 'MixStyle on an empty list of layers',
             ['--mixstyle', 'true', '--mixstyle-layers', '[]'], ['mixstyle_layers'], codes=cfg),
        _cli('a-dsu-unknown-layer', 'DSU on a layer the model lacks', ['--dsu', 'true', '--dsu-layers', '[layer9]'],
             ['dsu_layers', 'layer9'], codes=cfg),
        _cli('a-compile-mode-backend', 'an inductor mode with the eager backend',
             ['--compile', 'true', '--compile-mode', 'reduce-overhead', '--compile-backend', 'eager'],
             ['compile_mode', 'eager'], codes=cfg),
        _cli('a-triton-and-compile', "moex_impl 'triton' under compile",
             ['--moex', 'true', '--moex-impl', 'triton', '--compile', 'true'], ['moex_impl', 'triton'], codes=cfg),
        _cli('a-sync-bn-one-cpu', 'sync_bn on one CPU process (refused, or trained as plain BatchNorm)',
             ['--sync-bn', 'true'], ['sync_bn'], expect='either', check=_expect_files('results.json')),
        # precision
        _cli('a-fp16-on-cpu', 'fp16 on a CPU: refused, or run and recorded as what ran',
             ['--mixed-precision', 'fp16'], ['fp16'], expect='either', check=_fp16_recorded),
        _cli('a-bf16-on-cpu', 'bf16 on a CPU trains and records bf16', ['--mixed-precision', 'bf16'], expect='ok',
             check=_expect_files('results.json', results=dict(mixed_precision='bf16'))),
        # sizes
        _cli('a-img-size-vit', 'a ViT made for 224 px on 40 px images', ['--model', 'vit_tiny_patch16_224',
             '--img-size', '40'], ['img_size', '40'], codes=cfg),
        _cli('a-batch-above-train-set', 'a batch larger than the training set', ['--batch-size', '64'],
             ['batch_size', '64']),
        _cli('a-num-classes-too-few', '--num-classes 3 for the 10 digit classes', ['--num-classes', '3'],
             ['num_classes', '3']),
        _cli('a-num-classes-more', '--num-classes 20 for 10 classes (extra logits, or refused)',
             ['--num-classes', '20'], ['num_classes', '20'], expect='either', check=_expect_files('results.json')),
        _cli('a-train-limit-above-data', '--train-limit above the data set (all images, or refused)',
             ['--train-limit', '100000', '--epochs', '1', '--eval-limit', '16'], ['train_limit'], expect='either',
             check=_expect_files('results.json'), timeout=600),
        # --help and --debug
        _cli('a-help', '--help lists the keys', ['--help'], expect='ok', fast=False,
             check=_help_lists('--moex-prob')),
        _cli('a-debug-traceback', '--debug with a bad value shows the traceback (asked for)',
             ['--epochs', '0', '--debug'], expect='error', check_error=_debug_shows_traceback),
        _cli('a-debug-env-traceback', 'TIMM_MOEX_DEBUG=1 with a value of the wrong type shows the traceback',
             ['--lr', 'abc'], expect='error', env={'TIMM_MOEX_DEBUG': '1'}, check_error=_debug_shows_traceback),
    ]
    # --config files
    cases += [
        _cli('a-config-missing', '--config a file that does not exist', ['--config', '{tmp}/nope.yaml'],
             ['nope.yaml'], codes=cfg),
        _cli('a-config-folder', '--config a folder', ['--config', '{tmp}/cfgdir'], ['cfgdir', 'folder'], codes=cfg,
             setup=lambda tmp, fx: (tmp / 'cfgdir').mkdir()),
        _cli('a-config-run-folder', '--config a run folder (its config.yaml is inside)', ['--config', RUN],
             ['myrun', 'config.yaml'], codes=cfg, needs=('run',), watch=True),
        _yaml_case('a-config-bad-yaml', 'a YAML file with an unclosed list', 'epochs: [1, 2\n', ['c.yaml'],
                   codes=cfg),
        _yaml_case('a-config-tabs', 'a YAML file indented with a tab', 'model: resnet10t\n\tepochs: 1\n', ['c.yaml'],
                   codes=cfg),
        _yaml_case('a-config-list', 'a YAML list, not a mapping', '- epochs: 1\n- lr: 0.1\n', ['c.yaml'],
                   codes=cfg),
        _yaml_case('a-config-scalar', 'a YAML scalar, not a mapping', 'hello\n', ['c.yaml'], codes=cfg),
        _yaml_case('a-config-nonstring-key', 'a YAML key that is a number', '1: 2\n', ['1'], codes=cfg),
        _yaml_case('a-config-wrong-type', 'epochs: ten in YAML', 'epochs: ten\n', ['epochs', 'ten'], codes=cfg),
        _yaml_case('a-config-null', 'epochs: null in YAML', 'epochs: null\n', ['epochs'], codes=cfg),
        _yaml_case('a-config-unknown-key', 'an unknown key in YAML', 'lerning_rate: 0.1\n', ['lerning_rate'],
                   codes=cfg),
        _yaml_case('a-config-moex-typo', 'moex_prb: 0.0 in YAML (a typo of moex_prob)', 'moex: true\nmoex_prb: 0.0\n',
                   ['moex_prb'], codes=cfg),
        _yaml_case('a-config-empty', 'an empty YAML file (the defaults, or refused)', '', ['c.yaml'],
                   expect='either', check=_expect_files('results.json')),
        _cli('a-config-binary', '--config a binary file', ['--config', '{tmp}/c.yaml'], ['c.yaml'], codes=cfg,
             setup=lambda tmp, fx: (tmp / 'c.yaml').write_bytes(bytes(range(256)) * 4)),
        _cli('a-config-recipe-name', '--config quickstart (a recipe name) trains the recipe',
             ['--config', 'quickstart'], expect='ok', yaml_keys=('dataset', 'model'),
             check=_expect_files('results.json', config=dict(dataset='digits', model='resnet10t', moex=True,
                                                            moex_prob=0.25))),
        _cli('a-config-recipe-file-name', '--config quickstart.yaml (the recipe by its file name)',
             ['--config', 'quickstart.yaml'], expect='ok', yaml_keys=('dataset', 'model'),
             check=_expect_files('results.json', config=dict(moex=True))),
        _cli('a-config-recipe-typo', '--config quikstart (a typo of a recipe name)', ['--config', 'quikstart'],
             ['quikstart', 'quickstart'], codes=cfg),
        _cli('a-config-cli-wins', '--config quickstart --moex-prob 0.5: the command line wins',
             ['--config', 'quickstart', '--moex-prob', '0.5'], expect='ok', yaml_keys=('dataset', 'model'),
             check=_expect_files('results.json', config=dict(moex_prob=0.5))),
    ]
    return cases


def _help_lists(*options: str) -> Callable:
    """A check of --help: an option it lacks is an unclear help text."""
    def check(tmp: Path, run: Run):
        lacking = [o for o in options if o not in run.stdout]
        return ('unclear', f'--help does not show {", ".join(lacking)}') if lacking else None
    return check


def _fp16_recorded(tmp: Path, run: Run) -> Optional[str]:
    folder = tmp / 'myrun'
    recorded = {name: (_read_yaml if name.endswith('yaml') else _read_json)(folder / name).get('mixed_precision')
                for name in ('config.yaml', 'results.json')}
    if 'fp16' in recorded.values():
        return f'records fp16 ({recorded}) for a CPU run, which runs fp32'
    return None


def _debug_shows_traceback(tmp: Path, run: Run):
    if TRACEBACK in run.stderr and run.rc == EXIT['config']:
        return 'good', ''
    return 'unclear', f'--debug: exit {run.rc}, traceback shown: {TRACEBACK in run.stderr}'


def _resume(*argv: str) -> List[str]:
    """A resume of the base run (MoEx on, 2 epochs) with ``argv``."""
    return ['--moex', 'true', '--resume', 'auto', *argv]


def _config_unchanged(**want) -> Callable:
    def check(tmp: Path, run: Run) -> Optional[str]:
        saved = _read_yaml(tmp / 'myrun' / 'config.yaml')
        wrong = {k: saved.get(k) for k, v in want.items() if saved.get(k) != v}
        return f'config.yaml now records {wrong}, which never trained' if wrong else None
    return check


def _hold_lock(tmp: Path, fx: Fixtures) -> Callable:
    """Another process holding the run folder's lock, as a second training run would."""
    code = ('import fcntl, os, sys, time\n'
            'fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n'
            'fcntl.flock(fd, fcntl.LOCK_EX)\n'
            'os.ftruncate(fd, 0); os.write(fd, f"{os.getpid()}\\n".encode())\n'
            'print("locked", flush=True)\n'
            'time.sleep(900)\n')
    proc = subprocess.Popen([sys.executable, '-c', code, str(tmp / 'myrun' / '.lock')], stdout=subprocess.PIPE,
                            text=True)
    proc.stdout.readline()
    return lambda: (proc.kill(), proc.wait())


def _damage(rel: str, how: str = 'truncate') -> Callable:
    def setup(tmp: Path, fx: Fixtures) -> None:
        path = tmp / 'myrun' / rel
        if how == 'truncate':
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
        else:
            path.write_text(how)
    return setup


def _setpriv() -> List[str]:
    """Run without the root's override of file permissions, so that a read-only folder is read-only."""
    if os.geteuid() != 0:
        return []
    return ['setpriv', '--inh-caps=-dac_override', '--bounding-set=-dac_override', '--']


def _read_only(rel: str) -> Callable:
    def setup(tmp: Path, fx: Fixtures) -> Callable:
        path = tmp / rel
        path.mkdir(exist_ok=True)
        targets = [path, *path.rglob('*')]
        for p in targets:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        return lambda: [p.chmod(p.stat().st_mode | stat.S_IWUSR) for p in targets if p.exists()]
    return setup


def _family_b() -> List[Case]:
    run, ok = ('run',), dict(expect='ok')
    mismatch = (EXIT['mismatch'],)
    return [
        _cli('b-base-run', 'a 2-epoch run with MoEx (the run the other cases resume)',
             ['--moex', 'true', '--epochs', '2'],
             check=_expect_files('results.json', 'checkpoint-1', 'checkpoint-2', 'model.safetensors', rows=2,
                                 config=dict(epochs=2, model='resnet10t', moex=True),
                                 results=dict(epochs=2)), **ok),
        _cli('b-busy', 'a run folder another training process holds', _resume('--epochs', '3'), ['myrun'],
             codes=(EXIT['busy'],), needs=run, watch=True, setup=_hold_lock),
        _cli('b-existing-run-no-resume', 'a new run into a folder that holds a run',
             ['--moex', 'true', '--epochs', '3'],
             ['myrun', 'resume'], needs=run, watch=True),
        _cli('b-resume-other-model', '--resume auto with another model',
             _resume('--model', 'resnet14t', '--epochs', '3'),
             ['model', 'resnet14t'], codes=mismatch, needs=run, watch=True),
        _cli('b-resume-other-moex-prob', '--resume auto with another moex_prob',
             _resume('--moex-prob', '0.5', '--epochs', '3'), ['moex_prob', '0.5'], codes=mismatch, needs=run,
             watch=True),
        _cli('b-resume-other-batch', '--resume auto with another batch size',
             _resume('--batch-size', '8', '--epochs', '3'),
             ['batch_size', '8'], codes=mismatch, needs=run, watch=True),
        _cli('b-resume-moex-off', '--resume auto of a MoEx run without --moex', ['--resume', 'auto', '--epochs', '3'],
             ['moex'], codes=mismatch, needs=run, watch=True),
        _cli('b-resume-new-lr', '--resume auto --epochs 3 --lr 0.05 continues and records the change',
             _resume('--epochs', '3', '--lr', '0.05'), needs=run,
             check=_expect_files('results.json', 'resume.jsonl', rows=3, config=dict(lr=0.05, epochs=3)), **ok),
        _cli('b-resume-nothing', '--resume auto where there is no run (a typo in --output-dir): says so, or refuses',
             _resume('--output-dir', '{tmp}/mynewrun'), ['mynewrun'], expect='either',
             check=_says_new_run),
        _cli('b-resume-checkpoint-1', '--resume <run>/checkpoint-1 retrains epoch 2',
             ['--moex', 'true', '--resume', f'{RUN}/checkpoint-1', '--epochs', '2'], needs=run,
             check=_expect_files('results.json', rows=2), **ok),
        _cli('b-resume-run-folder', '--resume <run folder> instead of a checkpoint folder',
             ['--moex', 'true', '--resume', RUN, '--epochs', '3'], ['myrun'], expect='either', needs=run,
             check=_expect_files('results.json', rows=3)),
        _cli('b-resume-empty-config', '--resume auto with an empty config.yaml', _resume('--epochs', '3'),
             ['config.yaml'], needs=run, watch=True, setup=_damage('config.yaml', '')),
        _cli('b-resume-garbage-config', '--resume auto with a damaged config.yaml', _resume('--epochs', '3'),
             ['config.yaml'], needs=run, watch=True, setup=_damage('config.yaml', 'epochs: [1,\n')),
        _cli('b-resume-list-config', '--resume auto with a config.yaml that holds a list', _resume('--epochs', '3'),
             ['config.yaml'], needs=run, watch=True, setup=_damage('config.yaml', '- 1\n- 2\n')),
        _cli('b-resume-damaged-latest', '--resume auto with a truncated latest checkpoint: resumes the one before, '
             'and says so', _resume('--epochs', '3'), needs=run, setup=_damage('checkpoint-2/model.safetensors'),
             check=_resumed_from_older, **ok),
        _cli('b-resume-damaged-explicit', '--resume <truncated checkpoint-2>',
             ['--moex', 'true', '--resume', f'{RUN}/checkpoint-2', '--epochs', '3'], ['checkpoint-2'],
             codes=(EXIT['checkpoint'],), needs=run, watch=True, setup=_damage('checkpoint-2/model.safetensors')),
        _cli('b-resume-empty-folder', '--resume <an empty folder>',
             ['--moex', 'true', '--resume', '{tmp}/emptyckpt', '--epochs', '3'], ['emptyckpt'], needs=run, watch=True,
             setup=lambda tmp, fx: (tmp / 'emptyckpt').mkdir()),
        _cli('b-epochs-below-trained', '--resume auto --epochs 1 of a 2-epoch run', _resume('--epochs', '1'),
             ['epochs', '1'], codes=mismatch, needs=run, watch=True, check_error=_config_unchanged(epochs=2)),
        _cli('b-epochs-equal-trained', '--resume auto --epochs 2 of a 2-epoch run: nothing to train, says so',
             _resume('--epochs', '2'), needs=run,
             check=_expect_files('results.json', rows=2, config=dict(epochs=2), output=['nothing to train']), **ok),
        _cli('b-diverged-resume-record', '--resume auto --epochs 3 --lr 1e30: diverges; config.yaml keeps what trained',
             _resume('--epochs', '3', '--lr', '1e30'), ['lr'], codes=(EXIT['diverged'],), needs=run, watch=True,
             check_error=_config_unchanged(epochs=2, lr=None)),
        _cli('b-leftover-tmp-checkpoint', '--resume auto next to the .tmp folder of a killed save',
             _resume('--epochs', '3'), needs=run, setup=_write('myrun/.checkpoint-3.tmp/junk.bin', 'partial'),
             check=_expect_files('results.json', rows=3), **ok),
        _cli('b-stale-lock', '--resume auto with a .lock left by a dead process', _resume('--epochs', '3'), needs=run,
             setup=_write('myrun/.lock', '999999\n'), check=_expect_files('results.json', rows=3), **ok),
        _cli('b-output-parent-is-file', '--output-dir under a file', ['--output-dir', '{tmp}/afile/run'], ['afile'],
             setup=_write('afile', 'a file\n')),
        _cli('b-output-is-file', '--output-dir is a file', ['--output-dir', '{tmp}/afile'], ['afile'],
             setup=_write('afile', 'a file\n')),
        _cli('b-output-read-only', '--output-dir in a read-only folder', ['--output-dir', '{tmp}/rodir/run'], ['rodir'],
             setup=_read_only('rodir'), prefix=_setpriv(), needs=('setpriv',)),
        _cli('b-resume-read-only-run', '--resume auto of a read-only run folder', _resume('--epochs', '3'), ['myrun'],
             setup=_read_only('myrun'), prefix=_setpriv(), needs=('run', 'setpriv'), watch=True),
        _cli('b-eval-only-run', '--eval-only --checkpoint <run folder> writes eval.json',
             ['--eval-only', 'true', '--checkpoint', RUN, '--output-dir', '{tmp}/evalout'], needs=run,
             check=lambda tmp, run: None if (tmp / 'evalout' / 'eval.json').is_file() else 'no eval.json', **ok),
        _cli('b-eval-only-checkpoint-folder', '--eval-only --checkpoint <run>/checkpoint-1',
             ['--eval-only', 'true', '--checkpoint', f'{RUN}/checkpoint-1', '--output-dir', '{tmp}/evalout'], needs=run,
             check=lambda tmp, run: None if (tmp / 'evalout' / 'eval.json').is_file() else 'no eval.json', **ok),
    ]


def _says_new_run(tmp: Path, run: Run) -> Optional[str]:
    text = _norm(run.stdout + run.stderr)
    if not (tmp / 'mynewrun' / 'results.json').is_file():
        return 'no results.json after exit 0'
    if not any(w in text for w in ('no checkpoint', 'nothing to resume', 'new run', 'from scratch', 'starting')):
        return '--resume auto found nothing and trained from scratch without a word'
    return None


def _resumed_from_older(tmp: Path, run: Run):
    problem = _expect_files('results.json', rows=3, output=['checkpoint-2'])(tmp, run)
    if problem:
        return problem
    echoed = [ln.strip() for ln in run.stderr.splitlines() if re.match(r'^\s+warnings\.warn\(', ln)]
    if echoed:
        return 'unclear', f'the warning prints its source line: {echoed[0][:100]}'
    return None


def _family_c() -> List[Case]:
    w = '{fx}/weights'
    weights, chk = ('weights',), (EXIT['checkpoint'],)

    def eval_only(file: str) -> List[str]:
        return ['--eval-only', 'true', '--checkpoint', f'{w}/{file}']

    def init(file: str) -> List[str]:
        return ['--initial-checkpoint', f'{w}/{file}']

    return [
        _cli('c-eval-garbage-pth', '--eval-only a .pth of random bytes', eval_only('garbage.pth'), ['garbage.pth'],
             codes=chk, needs=weights),
        _cli('c-eval-truncated-pth-tar', '--eval-only a truncated .pth.tar', eval_only('truncated.pth.tar'),
             ['truncated.pth.tar'], codes=chk, needs=weights),
        _cli('c-eval-empty-safetensors', '--eval-only an empty .safetensors', eval_only('empty.safetensors'),
             ['empty.safetensors'], codes=chk, needs=weights),
        _cli('c-eval-truncated-safetensors', '--eval-only a truncated .safetensors',
             eval_only('truncated.safetensors'), ['truncated.safetensors'], codes=chk, needs=weights),
        _cli('c-eval-list-pth', '--eval-only a .pth that holds a list', eval_only('list.pth'), ['list.pth'], codes=chk,
             needs=weights),
        _cli('c-eval-timm-checkpoint', "--eval-only a timm train.py checkpoint (its args Namespace inside)",
             eval_only('namespace.pth.tar'), ['namespace.pth.tar'], expect='either', needs=weights,
             check=lambda tmp, run: None if (tmp / 'myrun' / 'eval.json').is_file() else 'no eval.json'),
        _cli('c-eval-wrong-arch', '--eval-only weights of another architecture', eval_only('wrong_arch.pth'),
             ['wrong_arch.pth'], codes=chk, needs=weights),
        _cli('c-eval-other-classes', '--eval-only 5-class weights on the 10 digit classes',
             eval_only('five_classes.safetensors'), ['five_classes.safetensors'], codes=chk, needs=weights),
        _cli('c-eval-text-file', '--eval-only a text file', eval_only('notes.txt'), ['notes.txt'], needs=weights),
        _cli('c-eval-folder-without-weights', '--eval-only an empty folder', eval_only('noweights'), ['noweights'],
             needs=weights),
        _cli('c-eval-other-model-run', '--eval-only the resnet10t run with --model resnet18',
             ['--eval-only', 'true', '--checkpoint', RUN, '--model', 'resnet18', '--output-dir', '{tmp}/evalout'],
             ['myrun'], codes=chk, needs=('run',)),
        _cli('c-init-garbage', '--initial-checkpoint a .pth of random bytes', init('garbage.pth'), ['garbage.pth'],
             codes=chk, needs=weights),
        _cli('c-init-truncated', '--initial-checkpoint a truncated .pth.tar', init('truncated.pth.tar'),
             ['truncated.pth.tar'], codes=chk, needs=weights),
        _cli('c-init-wrong-arch', '--initial-checkpoint weights of another architecture', init('wrong_arch.pth'),
             ['wrong_arch.pth'], codes=chk, needs=weights),
        _cli('c-init-other-classes', '--initial-checkpoint 5-class weights: the classifier re-initialized, said',
             init('five_classes.safetensors'), expect='ok', needs=weights,
             check=_expect_files('results.json', output=['initiali|classifier|num_classes'])),
        _cli('c-init-module-prefix', "--initial-checkpoint {'state_dict': {'module.' + key}} (the paper's format)",
             init('module_prefix.pth.tar'), expect='ok', needs=weights, check=_expect_files('results.json')),
        _cli('c-init-run-folder', '--initial-checkpoint <a run folder>',
             ['--initial-checkpoint', RUN, '--output-dir', '{tmp}/finetune'], expect='ok', needs=('run',),
             check=lambda tmp, run: None if (tmp / 'finetune' / 'results.json').is_file() else 'no results.json'),
        _cli('c-pretrained-offline', '--pretrained true with HF_HUB_OFFLINE=1', ['--model', 'resnet18',
             '--pretrained', 'true'], ['pretrained'], env={'HF_HUB_OFFLINE': '1'}, timeout=300),
    ]


def _rm(*rels: str) -> Callable:
    def mutate(data: Path) -> None:
        for rel in rels:
            shutil.rmtree(data / rel)
    return mutate


def _bad_file(rel: str, content: Any) -> Callable:
    """Write ``content`` (bytes, text, or a callable that makes bytes from a good image) at data/``rel``."""
    def mutate(data: Path) -> None:
        good = (data / 'train' / CLASSES[0] / '000.png')
        path = data / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            path.write_bytes(content(good))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return mutate


def _truncated_jpeg(good: Path) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.open(good).convert('RGB').resize((96, 96)).save(buf, 'JPEG', quality=95)
    data = buf.getvalue()
    return data[:len(data) // 2]


def _truncated_png(good: Path) -> bytes:
    data = good.read_bytes()
    return data[:len(data) // 2]


def _odd_images(data: Path) -> None:
    from PIL import Image
    folder = data / 'train' / CLASSES[0]
    Image.open(folder / '000.png').convert('L').save(folder / 'gray.png')
    Image.open(folder / '001.png').convert('RGBA').save(folder / 'rgba.png')
    Image.open(folder / '002.png').convert('P').save(folder / 'palette.png')


def _mixed_sizes(data: Path) -> None:
    from PIL import Image
    folder = data / 'train' / CLASSES[0]
    Image.open(folder / '000.png').resize((20, 20)).save(folder / 'small.png')
    Image.open(folder / '001.png').resize((48, 48)).save(folder / 'large.png')


def _one_class(data: Path) -> None:
    for split in ('train', 'test'):
        shutil.rmtree(data / split / CLASSES[1])


def _other_test_class(data: Path) -> None:
    (data / 'test' / CLASSES[1]).rename(data / 'test' / 'cow')


def _empty_class(data: Path) -> None:
    for p in (data / 'train' / CLASSES[1]).iterdir():
        p.unlink()


def _flat_train(data: Path) -> None:
    for name in CLASSES:
        for p in (data / 'train' / name).iterdir():
            p.rename(data / 'train' / f'{name}_{p.name}')
        (data / 'train' / name).rmdir()


def _empty_splits(data: Path) -> None:
    for split in ('train', 'test'):
        shutil.rmtree(data / split)
        (data / split).mkdir()


def _family_d() -> List[Case]:
    data, ok = (EXIT['data'],), dict(expect='ok', check=_expect_files('results.json'))

    def img(id, what, argv, names, mutate=None, **kwargs) -> Case:
        return _cli(id, what, [*IMAGES, *argv], names, setup=_images(mutate), **kwargs)

    cases = [
        _cli('d-missing-dir', 'an ImageFolder that does not exist',
             ['--dataset', 'imagefolder', '--data-dir', '{tmp}/nodata', '--img-size', '32'], ['nodata'], codes=data),
        _cli('d-data-dir-is-file', '--data-dir a file', ['--dataset', 'imagefolder', '--data-dir', '{tmp}/datafile',
             '--img-size', '32'], ['datafile'], codes=data, setup=_write('datafile', 'x\n')),
        _cli('d-empty-dir', 'an empty data folder', ['--dataset', 'imagefolder', '--data-dir', '{tmp}/emptydata',
             '--img-size', '32'], ['emptydata'], codes=data, setup=lambda tmp, fx: (tmp / 'emptydata').mkdir()),
        img('d-empty-splits', 'train/ and test/ without class folders', [], ['train'], _empty_splits, codes=data),
        img('d-no-test-split', 'no test/ or val/ folder', [], ['test'], _rm('test'), codes=data),
        img('d-flat-train', 'images directly in train/, no class folders', [], ['train'], _flat_train, codes=data),
        img('d-one-class', 'an ImageFolder of one class', [], ['class'], _one_class, codes=data),
        img('d-empty-class', 'a class folder without images', [], [CLASSES[1]], _empty_class, codes=data),
        img('d-test-class-unknown', 'a test class the training set does not have', [], ['cow'], _other_test_class,
            codes=data),
        img('d-non-image-file', 'a notes.txt among the images (skipped)', [], [],
            _bad_file(f'train/{CLASSES[0]}/notes.txt', 'notes\n'), **ok),
        img('d-gray-rgba-palette', 'grayscale, RGBA and palette PNGs among RGB ones', [], [], _odd_images, **ok),
        img('d-mixed-sizes', 'images of 20 and 48 px with img_size 32 (resized, or refused naming the file)', [],
            ['small.png'], _mixed_sizes, expect='either', check=_expect_files('results.json')),
        img('d-mixed-sizes-device', 'images of 20 and 48 px, --loader device', ['--loader', 'device'], ['small.png'],
            _mixed_sizes, expect='either', check=_expect_files('results.json')),
        img('d-num-classes-one', '--num-classes 1 for a 2-class folder', ['--num-classes', '1'], ['num_classes', '1']),
        img('d-bad-image-in-test', 'text saved as .jpg in test/', [], ['text.jpg'],
            _bad_file(f'test/{CLASSES[0]}/text.jpg', 'not an image\n'), codes=data),
        img('d-zero-byte-jpg', 'a 0-byte .jpg', [], ['zero.jpg'], _bad_file(f'train/{CLASSES[0]}/zero.jpg', b''),
            codes=data),
        _cli('d-cifar-missing', 'cifar10 not in --data-dir', ['--dataset', 'cifar10', '--data-dir', '{tmp}/nocifar'],
             ['nocifar'], codes=data),
        _cli('d-cifar-download-offline', 'cifar10 with --download true and no internet',
             ['--dataset', 'cifar10', '--data-dir', '{tmp}/nocifar', '--download', 'true'], ['download'],
             timeout=300),
        _cli('d-imagenet-no-val', "dataset imagenet without val/", ['--dataset', 'imagenet', '--data-dir', '{tmp}/data',
             '--img-size', '32'], ['val'], codes=data, setup=_images(_rm('test'))),
        _cli('d-digits-data-dir-unused', 'digits with a --data-dir that does not exist (unused)',
             ['--data-dir', '{tmp}/nothing'], **ok),
    ]
    for loader, argv in (('w0', ['--workers', '0']), ('w2', ['--workers', '2']), ('device', ['--loader', 'device'])):
        cases += [
            img(f'd-truncated-png-{loader}', f'a truncated PNG, {" ".join(argv)}', argv, ['broken.png'],
                _bad_file(f'train/{CLASSES[0]}/broken.png', _truncated_png), codes=data),
            img(f'd-text-as-jpg-{loader}', f'text saved as .jpg, {" ".join(argv)}', argv, ['text.jpg'],
                _bad_file(f'train/{CLASSES[0]}/text.jpg', 'not an image\n'), codes=data),
            img(f'd-truncated-jpeg-{loader}', f'a truncated JPEG, {" ".join(argv)}', argv, ['cut.jpg'],
                _bad_file(f'train/{CLASSES[0]}/cut.jpg', _truncated_jpeg), codes=data),
        ]
    return cases


# ---------------------------------------------------------------------------------------------
# Family e: the Python API, called in one worker process
class _Lazy:
    """torch, timm and timm_moex, imported when a case first runs (the case list itself imports nothing)."""

    def __getattr__(self, name: str):
        import importlib
        return importlib.import_module('timm_moex' if name == 'tm' else name)


L = _Lazy()


def _x(n: int = 4, c: int = 8, size: int = 6, seed: int = 0):
    return L.torch.randn(n, c, size, size, generator=L.torch.Generator().manual_seed(seed))


def _perm(*values: int):
    return L.torch.tensor(values or (1, 0, 3, 2))


def _model(name: str = 'resnet10t', **kwargs):
    L.tm  # noqa: B018  (registers the package's models with timm)
    L.torch.manual_seed(0)
    return L.timm.create_model(name, num_classes=kwargs.pop('num_classes', 4), **kwargs)


def _hooked(**kwargs):
    model = _model()
    return model, L.tm.attach_moex(model, **kwargs)


def _armed_forward(perm, **kwargs):
    model, hook = _hooked(**kwargs)
    model.train()
    hook.arm(perm)
    return model(L.torch.randn(4, 3, 32, 32))


def _finite(value) -> Optional[str]:
    if not bool(L.torch.isfinite(value).all()):
        return f'a non-finite result: {value.flatten()[:4].tolist()}'
    return None


def _not_finite(value) -> Optional[str]:
    if bool(L.torch.isfinite(value).all()):
        return f'a finite result from a NaN/inf input: {value.flatten()[:4].tolist()}'
    return None


def _nan_contained(value) -> Optional[str]:
    """Sample 0 is NaN and perm = (1, 0, 3, 2): samples 2 and 3 must stay finite."""
    if not bool(L.torch.isfinite(value[2:]).all()):
        return 'the NaN of sample 0 spread to samples 2 and 3, which did not exchange with it'
    return None


def _bitempered_support_gradient():
    """t1 = t2 = 0.5, a label outside the tempered softmax's support: the released code's gradient is about -1."""
    logits = L.torch.tensor([[10.0, 0.0, -10.0]], requires_grad=True)
    L.tm.BiTemperedLogisticLoss(t1=0.5, t2=0.5, num_iters=30)(logits, L.torch.tensor([2])).backward()
    return logits.grad


def _gradient_at_label(grad) -> Optional[str]:
    if not float(grad[0, 2]) < -0.5:
        return (f'gradient {float(grad[0, 2]):.3g} at the label, the released code gives about -1 '
                '((p - y) * p**(t2 - t1), 0**0 = 1)')
    return None


def _no_hook(model) -> Optional[str]:
    return 'a hook is still attached' if L.tm.get_moex_hook(model) is not None else None


def _stripped_forward():
    model = _model('resnet18_moex')
    plain = _model('resnet18')
    L.tm.strip_moex(model)
    model.train(), plain.train()
    x = L.torch.randn(4, 3, 32, 32)
    L.torch.manual_seed(1)
    same = L.torch.allclose(model(x), plain(x))
    return model, same


def _snapmix_task(**kwargs):
    return L.tm.SnapMixTask(_model(), **kwargs)


def _task_forward(task, target):
    task.train()
    return task(L.torch.randn(4, 3, 32, 32), target)


def _moex_task_forward(target):
    model, hook = _hooked()
    return _task_forward(L.tm.MoExClassificationTask(model, L.tm.MoExMixing(hook, prob=1.0)), target)


def _mixing(**kwargs):
    return L.tm.MoExMixing(_hooked()[1], **kwargs)


def _bt(**kwargs):
    return L.tm.BiTemperedLogisticLoss(**kwargs)


def _api(id: str, what: str, call: Callable, names: Sequence[str] = (), expect: str = 'error',
         check: Optional[Callable] = None, **kwargs) -> Case:
    return Case(id, what, api=call, names=names, expect=expect, check=check, prog='python', **kwargs)


def _family_e() -> List[Case]:
    mx = lambda *args, **kwargs: L.tm.moment_exchange(*args, **kwargs)  # noqa: E731
    ce = lambda: L.torch.nn.CrossEntropyLoss()  # noqa: E731
    out = lambda: L.torch.randn(4, 3)  # noqa: E731
    nan = float('nan')
    return [
        # moment_exchange
        _api('e-mx-ok', 'moment_exchange(x, perm) of a good batch', lambda: mx(_x(), _perm()), expect='ok',
             check=_finite),
        _api('e-mx-perm-short', 'moment_exchange(x (4 samples), perm=[1, 0])', lambda: mx(_x(), _perm(1, 0)), ['perm']),
        _api('e-mx-perm-out-of-range', 'moment_exchange(x, perm=[0, 1, 2, 7])', lambda: mx(_x(), _perm(0, 1, 2, 7)),
             ['perm']),
        _api('e-mx-perm-negative', 'moment_exchange(x, perm=[-1, 0, 1, 2]) counts -1 from the end, as documented',
             lambda: mx(_x(), _perm(-1, 0, 1, 2)), expect='ok',
             check=lambda v: None if L.torch.allclose(v, mx(_x(), _perm(-1, 0, 1, 2) % 4)) else 'not perm % B'),
        _api('e-mx-perm-float', 'moment_exchange(x, perm=float tensor)', lambda: mx(_x(), _perm().float()), ['perm']),
        _api('e-mx-perm-2d', 'moment_exchange(x, perm of shape (1, 4))', lambda: mx(_x(), _perm()[None]), ['perm']),
        _api('e-mx-perm-meta', "moment_exchange(x, perm on the 'meta' device)", lambda: mx(_x(), _perm().to('meta')),
             ['perm']),
        _api('e-mx-perm-list', 'moment_exchange(x, perm=[1, 0, 3, 2] as a list): refused, or taken as the tensor',
             lambda: mx(_x(), [1, 0, 3, 2]), ['perm'], expect='either',
             check=lambda v: None if L.torch.allclose(v, mx(_x(), _perm())) else 'another result than the tensor'),
        _api('e-mx-eps-negative', 'moment_exchange(x, perm, eps=-1.0)', lambda: mx(_x(), _perm(), eps=-1.0), ['eps']),
        _api('e-mx-eps-nan', 'moment_exchange(x, perm, eps=nan)', lambda: mx(_x(), _perm(), eps=nan), ['eps']),
        _api('e-mx-norm-unknown', "moment_exchange(x, perm, norm='bn')", lambda: mx(_x(), _perm(), norm='bn'), ['bn']),
        _api('e-mx-norm-gn0', "moment_exchange(x, perm, norm='gn0')", lambda: mx(_x(), _perm(), norm='gn0'), ['gn0']),
        _api('e-mx-norm-gn-indivisible', "moment_exchange(x of 8 channels, perm, norm='gn3')",
             lambda: mx(_x(), _perm(), norm='gn3'), ['gn3']),
        _api('e-mx-channel-dim', 'moment_exchange(x (4-D), perm, channel_dim=4)',
             lambda: mx(_x(), _perm(), channel_dim=4), ['channel_dim']),
        _api('e-mx-impl-unknown', "moment_exchange(x, perm, impl='cuda')", lambda: mx(_x(), _perm(), impl='cuda'),
             ['cuda']),
        _api('e-mx-impl-triton-cpu', "moment_exchange(CPU x, perm, impl='triton'): refused, or the same result",
             lambda: mx(_x(), _perm(), impl='triton'), ['triton'], expect='either',
             check=lambda v: None if L.torch.allclose(v, mx(_x(), _perm(), impl='torch'), atol=1e-5) else
             'another result than the PyTorch ops'),
        _api('e-mx-int-x', 'moment_exchange(an int64 x, perm)', lambda: mx(_x().long(), _perm()), ['int64']),
        _api('e-mx-nan-sample', 'moment_exchange(x with sample 0 NaN, perm=(1, 0, 3, 2)): the NaN stays in its pair',
             lambda: mx(_x().index_fill_(0, _perm(0), nan), _perm()), expect='ok', check=_nan_contained),
        _api('e-mx-empty-batch', 'moment_exchange(an empty batch, an empty perm)',
             lambda: mx(_x(n=0), L.torch.zeros(0, dtype=L.torch.long)), ['empty'], expect='either',
             check=lambda v: None if tuple(v.shape) == (0, 8, 6, 6) else f'shape {tuple(v.shape)}'),
        _api('e-mx-batch-one', 'moment_exchange(one sample, perm=[0]) is the identity',
             lambda: (mx(_x(n=1), _perm(0)), _x(n=1)), expect='ok',
             check=lambda v: None if L.torch.allclose(v[0], v[1], atol=1e-5) else 'the sample changed'),
        # attach_moex, MoExHook
        _api('e-attach-layer-unknown', "attach_moex(model, layer='layer9')", lambda: _hooked(layer='layer9'),
             ['layer9']),
        _api('e-attach-layer-empty', "attach_moex(model, layer='')", lambda: _hooked(layer=''), ['layer']),
        _api('e-attach-norm-unknown', "attach_moex(model, norm='bn')", lambda: _hooked(norm='bn'), ['bn']),
        _api('e-attach-eps-negative', 'attach_moex(model, eps=-1)', lambda: _hooked(eps=-1.0), ['eps']),
        _api('e-attach-impl-unknown', "attach_moex(model, impl='cuda')", lambda: _hooked(impl='cuda'), ['cuda']),
        _api('e-attach-channel-dim', 'attach_moex(model, channel_dim=7), then an armed forward',
             lambda: _armed_forward(_perm(), channel_dim=7), ['channel_dim']),
        _api('e-attach-twice', 'attach_moex twice on one model: refused, or one hook',
             lambda: (lambda m: (L.tm.attach_moex(m), L.tm.attach_moex(m), m)[2])(_model()), ['already'],
             expect='either',
             check=lambda m: None if sum(len(x._forward_hooks) for x in m.modules()) <= 1 else 'two hooks'),
        _api('e-attach-not-a-model', "attach_moex('resnet18')", lambda: L.tm.attach_moex('resnet18'), ['model']),
        _api('e-attach-no-stem', "attach_moex(nn.Linear(4, 4)) (no stem)",
             lambda: L.tm.attach_moex(L.torch.nn.Linear(4, 4)), ['stem']),
        _api('e-hook-class-layer-unknown', "MoExHook(model, 'layer9')", lambda: L.tm.MoExHook(_model(), 'layer9'),
             ['layer9']),
        _api('e-hook-perm-short', 'hook.arm(perm of 2) before a forward of 4 samples',
             lambda: _armed_forward(_perm(1, 0)), ['perm']),
        _api('e-hook-perm-out-of-range', 'hook.arm([0, 1, 2, 9]) before a forward of 4 samples',
             lambda: _armed_forward(_perm(0, 1, 2, 9)), ['perm']),
        _api('e-hook-perm-list', 'hook.arm([1, 0, 3, 2]) (a list)', lambda: _armed_forward([1, 0, 3, 2]), ['perm']),
        _api('e-hook-removed-arm', 'hook.remove(), then hook.arm(perm)',
             lambda: (lambda mh: (mh[1].remove(), mh[1].arm(_perm())))(_hooked()), ['removed']),
        # MoExLoss
        _api('e-loss-criterion-not-callable', "MoExLoss('ce')(out, target, perm, 0.5)",
             lambda: L.tm.MoExLoss('ce')(out(), _perm(0, 1, 2, 0), _perm(), 0.5), ['criterion']),
        _api('e-loss-perm-short', 'MoExLoss(ce)(out (4), target, perm of 3, 0.5)',
             lambda: L.tm.MoExLoss(ce())(out(), _perm(0, 1, 2, 0), _perm(1, 0, 2), 0.5), ['perm']),
        _api('e-loss-perm-out-of-range', 'MoExLoss(ce)(out, target, perm=[0, 1, 2, 9], 0.5)',
             lambda: L.tm.MoExLoss(ce())(out(), _perm(0, 1, 2, 0), _perm(0, 1, 2, 9), 0.5), ['perm']),
        _api('e-loss-lam-above-one', 'MoExLoss(ce)(out, target, perm, lam=1.5)',
             lambda: L.tm.MoExLoss(ce())(out(), _perm(0, 1, 2, 0), _perm(), 1.5), ['lam']),
        _api('e-loss-lam-nan', 'MoExLoss(ce)(out, target, perm, lam=nan)',
             lambda: L.tm.MoExLoss(ce())(out(), _perm(0, 1, 2, 0), _perm(), nan), ['lam']),
        _api('e-loss-target-out-of-range', 'MoExLoss(ce)(out (3 classes), target=[0, 1, 2, 9], perm, 0.5)',
             lambda: L.tm.MoExLoss(ce())(out(), _perm(0, 1, 2, 9), _perm(), 0.5), ['target']),
        # MoExMixing
        _api('e-mixing-prob-above-one', 'MoExMixing(hook, prob=1.5)', lambda: _mixing(prob=1.5), ['prob']),
        _api('e-mixing-prob-nan', 'MoExMixing(hook, prob=nan)', lambda: _mixing(prob=nan), ['prob']),
        _api('e-mixing-lam-negative', 'MoExMixing(hook, lam=-0.1)', lambda: _mixing(lam=-0.1), ['lam']),
        _api('e-mixing-pairing-unknown', "MoExMixing(hook, pairing='shuffle')", lambda: _mixing(pairing='shuffle'),
             ['shuffle']),
        _api('e-mixing-hook-none', 'MoExMixing(None)', lambda: L.tm.MoExMixing(None), ['hook']),
        _api('e-mixing-prob-string', "MoExMixing(hook, prob='0.5'): refused, or read as 0.5",
             lambda: _mixing(prob='0.5'), ['prob'], expect='either',
             check=lambda m: None if m.prob == 0.5 else f'prob {m.prob!r}'),
        # MoExClassificationTask
        _api('e-task-moex-not-mixing', "MoExClassificationTask(model, moex='yes')",
             lambda: L.tm.MoExClassificationTask(_model(), moex='yes'), ['moex']),
        _api('e-task-model-none', 'MoExClassificationTask(None)', lambda: L.tm.MoExClassificationTask(None), ['model']),
        _api('e-task-target-out-of-range', 'MoExClassificationTask(model (4 classes), MoExMixing(prob=1)) on '
             'target [0, 1, 2, 9]',
             lambda: _moex_task_forward(_perm(0, 1, 2, 9)), ['target']),
        # SnapMixTask
        _api('e-snapmix-alpha-zero', 'SnapMixTask(model, alpha=0)', lambda: _snapmix_task(alpha=0.0), ['alpha']),
        _api('e-snapmix-prob-two', 'SnapMixTask(model, prob=2)', lambda: _snapmix_task(prob=2.0), ['prob']),
        _api('e-snapmix-same-label-unknown', "SnapMixTask(model, same_label='both')",
             lambda: _snapmix_task(same_label='both'), ['both']),
        _api('e-snapmix-no-classifier', 'SnapMixTask(nn.Sequential(conv, flatten)) (no linear head)',
             lambda: L.tm.SnapMixTask(L.torch.nn.Sequential(L.torch.nn.Conv2d(3, 4, 3), L.torch.nn.Flatten())),
             ['Sequential']),
        _api('e-snapmix-target-out-of-range', 'SnapMixTask(model (4 classes)) on target [0, 1, 2, 9]',
             lambda: _task_forward(_snapmix_task(), _perm(0, 1, 2, 9)), ['target']),
        # AutoMixTask
        _api('e-automix-alpha-negative', 'AutoMixTask(model, alpha=-1)', lambda: L.tm.AutoMixTask(_model(), alpha=-1.0),
             ['alpha']),
        _api('e-automix-lam-margin', 'AutoMixTask(model, lam_margin=0.7)',
             lambda: L.tm.AutoMixTask(_model(), lam_margin=0.7), ['lam_margin']),
        _api('e-automix-pairing-unknown', "AutoMixTask(model, pairing='shuffle')",
             lambda: L.tm.AutoMixTask(_model(), pairing='shuffle'), ['shuffle']),
        _api('e-automix-area-weight-negative', 'AutoMixTask(model, area_weight=-1)',
             lambda: L.tm.AutoMixTask(_model(), area_weight=-1.0), ['area_weight']),
        _api('e-automix-not-automix', "AutoMixTask(model, automix='x')",
             lambda: L.tm.AutoMixTask(_model(), automix='x'), ['automix']),
        # BiTemperedLogisticLoss
        _api('e-bt-t1-out-of-range', 'BiTemperedLogisticLoss(t1=2.5) (t1 is in (0, 2))', lambda: _bt(t1=2.5), ['t1']),
        _api('e-bt-t2-zero', 'BiTemperedLogisticLoss(t2=0)', lambda: _bt(t2=0.0), ['t2']),
        _api('e-bt-iters-zero', 'BiTemperedLogisticLoss(num_iters=0)', lambda: _bt(num_iters=0), ['num_iters']),
        _api('e-bt-reduction-unknown', "BiTemperedLogisticLoss(reduction='avg')", lambda: _bt(reduction='avg'),
             ['avg']),
        _api('e-bt-smoothing-above-one', 'BiTemperedLogisticLoss(smoothing=1.5)', lambda: _bt(smoothing=1.5),
             ['smoothing']),
        _api('e-bt-nan-logits', 'BiTemperedLogisticLoss()(NaN logits, target): a NaN loss, or refused',
             lambda: _bt()(L.torch.full((2, 3), nan), _perm(0, 1)), ['logits'], expect='either', check=_not_finite),
        _api('e-bt-inf-logits', 'BiTemperedLogisticLoss()(logits with an inf, target): a non-finite loss, or refused',
             lambda: _bt()(L.torch.tensor([[float('inf'), 0.0, 0.0], [0.0, 1.0, 2.0]]), _perm(0, 1)), ['logits'],
             expect='either', check=_not_finite),
        _api('e-bt-target-out-of-range', 'BiTemperedLogisticLoss()(logits (3 classes), target=[0, 7])',
             lambda: _bt()(L.torch.randn(2, 3), _perm(0, 7)), ['target']),
        _api('e-bt-soft-target-shape', 'BiTemperedLogisticLoss()(logits (4, 3), soft target (4, 5))',
             lambda: _bt()(L.torch.randn(4, 3), L.torch.full((4, 5), 0.2)), ['target']),
        _api('e-bt-ok', 'BiTemperedLogisticLoss()(logits, target) is finite',
             lambda: _bt()(L.torch.randn(4, 3), _perm(0, 1, 2, 0)), expect='ok', check=_finite),
        _api('e-bt-support-gradient', "BiTemperedLogisticLoss(t1=t2=0.5): gradient at a label outside the support "
             "(the released code's -1)", _bitempered_support_gradient, expect='ok', check=_gradient_at_label),
        # attach_mixstyle, attach_dsu
        _api('e-mixstyle-layer-unknown', "attach_mixstyle(model, layers=['layer9'])",
             lambda: L.tm.attach_mixstyle(_model(), layers=['layer9']), ['layer9']),
        _api('e-mixstyle-layers-empty', 'attach_mixstyle(model, layers=[])',
             lambda: L.tm.attach_mixstyle(_model(), layers=[]), ['layers']),
        _api('e-mixstyle-layers-string', "attach_mixstyle(model, layers='layer1') (a string, not a list)",
             lambda: L.tm.attach_mixstyle(_model(), layers='layer1'), ['layers'], expect='either',
             check=lambda h: None),
        _api('e-mixstyle-p-above-one', 'attach_mixstyle(model, p=1.5)', lambda: L.tm.attach_mixstyle(_model(), p=1.5),
             ['1.5']),
        _api('e-mixstyle-alpha-zero', 'attach_mixstyle(model, alpha=0)',
             lambda: L.tm.attach_mixstyle(_model(), alpha=0.0), ['alpha']),
        _api('e-mixstyle-mix-unknown', "attach_mixstyle(model, mix='domain')",
             lambda: L.tm.attach_mixstyle(_model(), mix='domain'), ['domain']),
        _api('e-dsu-p-negative', 'attach_dsu(model, p=-1)', lambda: L.tm.attach_dsu(_model(), p=-1.0), ['-1']),
        _api('e-dsu-layer-unknown', "attach_dsu(model, layers=['layer9'])",
             lambda: L.tm.attach_dsu(_model(), layers=['layer9']), ['layer9']),
        # timm.create_model('<x>_moex', moex_...=...), timm_moex.create_model
        _api('e-variant-norm-unknown', "timm.create_model('resnet18_moex', moex_norm='bn')",
             lambda: _model('resnet18_moex', moex_norm='bn'), ['bn']),
        _api('e-variant-layer-unknown', "timm.create_model('resnet18_moex', moex_layer='layer9')",
             lambda: _model('resnet18_moex', moex_layer='layer9'), ['layer9']),
        _api('e-variant-impl-unknown', "timm.create_model('resnet18_moex', moex_impl='cuda')",
             lambda: _model('resnet18_moex', moex_impl='cuda'), ['cuda']),
        _api('e-variant-eps-negative', "timm.create_model('resnet18_moex', moex_eps=-1)",
             lambda: _model('resnet18_moex', moex_eps=-1.0), ['eps']),
        _api('e-variant-kwarg-typo', "timm.create_model('resnet18_moex', moex_nrom='in')",
             lambda: _model('resnet18_moex', moex_nrom='in'), ['moex_nrom']),
        _api('e-variant-norm-in', "timm.create_model('resnet18_moex', moex_norm='in') hooks with 'in'",
             lambda: _model('resnet18_moex', moex_norm='in'), expect='ok',
             check=lambda m: None if L.tm.get_moex_hook(m).norm == 'in' else f'hook norm {L.tm.get_moex_hook(m).norm}'),
        _api('e-variant-features-only', "timm.create_model('resnet18_moex', features_only=True) keeps a hook",
             lambda: _model('resnet18_moex', features_only=True, num_classes=0), expect='ok',
             check=lambda m: None if L.tm.get_moex_hook(m) is not None else 'no hook'),
        _api('e-create-model-norm-unknown', "timm_moex.create_model('resnet18', moex={'norm': 'bn'})",
             lambda: L.tm.create_model('resnet18', moex={'norm': 'bn'}), ['bn']),
        _api('e-create-model-key-typo', "timm_moex.create_model('resnet18', moex={'nrom': 'in'})",
             lambda: L.tm.create_model('resnet18', moex={'nrom': 'in'}), ['nrom']),
        _api('e-register-unknown-base', "register_moex_variant('nonet18')",
             lambda: L.tm.register_moex_variant('nonet18'), ['nonet18']),
        # strip_moex
        _api('e-strip-none', 'strip_moex(None)', lambda: L.tm.strip_moex(None), ['model']),
        _api('e-strip-plain', 'strip_moex(a model without a hook) returns it unchanged',
             lambda: L.tm.strip_moex(_model()), expect='ok', check=_no_hook),
        _api('e-strip-variant', "strip_moex(resnet18_moex): no hook, the plain model's outputs",
             _stripped_forward, expect='ok',
             check=lambda v: _no_hook(v[0]) or (None if v[1] else 'outputs differ from the plain model')),
        _api('e-strip-twice', 'strip_moex twice', lambda: L.tm.strip_moex(L.tm.strip_moex(_model('resnet18_moex'))),
             expect='ok', check=_no_hook),
    ]


def run_api_case(case: Case, timeout: float) -> dict:
    """Call ``case.api`` (in the worker) under an alarm; the exception or the check's problem."""
    def alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    start = time.perf_counter()
    record = dict(id=case.id, exc_type=None, message='', problem=None, timed_out=False)
    try:
        value = case.api()
        signal.alarm(0)
        if case.check is not None:
            try:
                record['problem'] = case.check(value)
            except Exception as e:  # noqa: BLE001  the value was not what the check could read
                record['problem'] = f'an unreadable result ({type(e).__name__}: {str(e)[:120]})'
    except _Timeout:
        record['timed_out'] = True
    except Exception as e:  # noqa: BLE001  what the call raised is the outcome
        record.update(exc_type=type(e).__name__, message=str(e))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    record['seconds'] = time.perf_counter() - start
    return record


class _Timeout(BaseException):
    pass


def api_worker(ids: Sequence[str], out: Path, timeout: float) -> None:
    """Run the API cases ``ids`` in this process, one JSON line each in ``out`` as each ends."""
    import logging
    logging.disable(logging.WARNING)
    cases = {c.id: c for c in build_cases()}
    with open(out, 'a') as f:
        for id in ids:
            record = run_api_case(cases[id], timeout)
            if isinstance(record['problem'], tuple):
                record['problem'] = list(record['problem'])
            f.write(json.dumps(record) + '\n')
            f.flush()


# ---------------------------------------------------------------------------------------------
# Family f: moex-timm-train
TIMM_ARGS = ['--timm-train', '{timm_train}', '--data-dir', '{fx}/images', '--train-split', 'train', '--val-split',
             'test', '--model', 'resnet10t', '--num-classes', '2', '--img-size', '32', '-b', '8', '--epochs', '1',
             '--device', 'cpu', '-j', '0', '--no-prefetcher', '--lr', '0.01', '--output', '{tmp}/out',
             '--experiment', 'run', '--seed', '0']
# moex-timm-train's main(), run as the command does, printing the norm of the hook that ran
_HOOK_NORM = ('import sys\n'
              'from timm_moex.train.errors import ConfigError\n'
              'from timm_moex.train.timm_train import main\n'
              'try:\n'
              '    run = main(sys.argv[1:])\n'
              'except ConfigError as e:\n'
              '    print(f"moex-timm-train: {e}", file=sys.stderr)\n'
              '    sys.exit(e.exit_code)\n'
              'print("HOOK_NORM=" + run["task"].hook.norm)\n')


def _timm(id: str, what: str, argv: Sequence[str], names: Sequence[str] = (), base: bool = True,
          needs: Sequence[str] = ('timm',), **kwargs) -> Case:
    cmd = ['{python}', '-m', 'timm_moex.train.timm_train', *(TIMM_ARGS if base else []), *argv]
    return Case(id, what, cmd, prog='moex-timm-train', names=names, needs=needs, timeout=400, **kwargs)


def _moex_json(**want) -> Callable:
    def check(tmp: Path, run: Run) -> Optional[str]:
        path = tmp / 'out' / 'run' / 'moex.json'
        if not path.is_file():
            return 'no moex.json after exit 0'
        record = _read_json(path)
        for key, value in want.items():
            ok = value(record.get(key)) if callable(value) else record.get(key) == value
            if not ok:
                return f'moex.json records {key}={record.get(key)!r}'
        return None
    return check


def _records_hook_norm(tmp: Path, run: Run) -> Optional[str]:
    ran = re.search(r'HOOK_NORM=(\S+)', run.stdout)
    path = tmp / 'out' / 'run' / 'moex.json'
    if not ran or not path.is_file():
        return 'no moex.json or no hook after exit 0'
    recorded = _read_json(path).get('moex_norm')
    if recorded != ran.group(1):
        return f"moex.json records moex_norm {recorded!r}, the hook ran {ran.group(1)!r}"
    return None


def _says_unarmed(tmp: Path, run: Run) -> Optional[str]:
    text = run.stdout + run.stderr
    if 'moex-timm-train' in text or 'MoExClassificationTask' in text:
        return None
    return "a *_moex model trained without one exchange and nothing said so"


def _family_f() -> List[Case]:
    ok = dict(expect='ok')
    return [
        _timm('f-ok-run', 'a short run: moex.json counts the exchanged batches', [], **ok,
              check=_moex_json(moex_batches=lambda v: isinstance(v, int) and v > 0)),
        _timm('f-missing-data-dir', 'a data dir that does not exist', ['--data-dir', '{tmp}/nodata'], ['nodata']),
        _timm('f-unknown-model', 'an unknown model name', ['--model', 'resnet-18'], ['resnet-18']),
        _timm('f-yaml-moex-typo', "moex_prb: 0.0 in timm's --config YAML", ['--config', '{tmp}/c.yaml'], ['moex_prb'],
              setup=_write('c.yaml', 'moex_prb: 0.0\n')),
        _timm('f-yaml-moex-prob', "moex_prob: 0.0 in timm's --config YAML is used", ['--config', '{tmp}/c.yaml'],
              setup=_write('c.yaml', 'moex_prob: 0.0\n'), check=_moex_json(moex_prob=0.0, moex_batches=0), **ok),
        Case('f-moex-norm-on-variant',
             '--moex-norm in on resnet18_cifar_moex: refused, or used and recorded as what ran',
             ['{python}', '-c', _HOOK_NORM, *TIMM_ARGS, '--model', 'resnet18_cifar_moex', '--moex-norm', 'in'],
             prog='moex-timm-train', names=['moex_norm'], expect='either', needs=('timm',), timeout=400,
             check=_records_hook_norm),
        _timm('f-moex-norm-unknown', '--moex-norm bn', ['--moex-norm', 'bn'], ['bn']),
        _timm('f-moex-prob-two', '--moex-prob 2', ['--moex-prob', '2'], ['moex_prob', '2']),
        _timm('f-moex-eps-negative', '--moex-eps=-1', ['--moex-eps=-1'], ['moex_eps', '-1']),
        _timm('f-moex-layer-unknown', '--moex-layer layer9', ['--moex-layer', 'layer9'], ['layer9']),
        _timm('f-kd-model', '--kd-model-name (distillation) with MoEx', ['--kd-model-name', 'resnet18'],
              ['kd_model_name']),
        _timm('f-timm-train-missing', '--timm-train a file that does not exist', ['--timm-train', '{tmp}/nope.py'],
              ['nope.py'], needs=()),
        _timm('f-no-timm-train', "no --timm-train and no $TIMM_TRAIN_PY", [], [TIMM_TRAIN_ENV], base=False, needs=(),
              env={TIMM_TRAIN_ENV: None}),
        _timm('f-help', "--help shows timm's options and the --moex-* ones", ['--timm-train', '{timm_train}', '--help'],
              base=False, **ok,
              check=_help_lists('--moex-prob', '--model')),
        _timm('f-help-without-train-py', '--help without timm\'s train.py shows the --moex-* options', ['--help'],
              base=False, needs=(), env={TIMM_TRAIN_ENV: None}, **ok,
              check=_help_lists('--moex-prob')),
        Case('f-timm-script-unarmed', "timm's own train.py --device-modules timm_moex --model resnet18_cifar_moex: "
             'says that MoEx never ran',
             ['{python}', '{timm_train}', '--device-modules', 'timm_moex', *TIMM_ARGS[2:], '--data-dir', '{fx}/many',
              '--model', 'resnet18_cifar_moex', '-b', '2'],
             prog='train.py', expect='ok', needs=('timm',), timeout=600, check=_says_unarmed),
    ]


# ---------------------------------------------------------------------------------------------
# Family g: signals and accelerate launch -q
def _signal_runner(sig: int, after: str, resume: bool = True, twice: bool = False) -> Callable:
    """Start a long run, send ``sig`` once ``after`` ('checkpoint-1', 'config.yaml' or a number of seconds)
    appears, classify the exit, check that the checkpoints are kept, then resume it when ``resume``."""
    def runner(case: Case, tmp: Path, fx: Fixtures) -> Tuple[str, str, str]:
        cmd = substitute(case.cmd, tmp, fx)
        env = _env(case.env)
        folder = tmp / 'myrun'
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors='replace', start_new_session=True)
        try:
            while proc.poll() is None and time.perf_counter() - start < 400:
                if after.replace('.', '').isdigit():
                    if time.perf_counter() - start >= float(after):
                        break
                elif (folder / after).exists():
                    break
                time.sleep(0.1)
            if proc.poll() is not None:
                out, err = proc.communicate()
                return 'unclear', f'the run ended (exit {proc.returncode}) before {after}: {_last_line(err)}', ''
            before = {k: v for k, v in snapshot(folder).items() if k.startswith('checkpoint-')}
            if sig == signal.SIGINT:  # Ctrl-C reaches the whole foreground process group
                os.killpg(proc.pid, sig)
                if twice:
                    time.sleep(0.5)
                    os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                return 'hang', 'no exit within 120 s of the signal', ''
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.communicate()
        codes = (EXIT['sigint'],) if sig == signal.SIGINT else (EXIT['sigterm'],)
        outcome, note = classify('error', case.names, case.prog, proc.returncode, err, out,
                                 lost=lost_files(before, folder), codes=codes)
        if outcome != 'good' or not resume:
            return outcome, note, _last_line(err)
        latest = max((int(p.name.split('-')[1]) for p in folder.glob('checkpoint-*')), default=0)
        again = execute(cmd + ['--resume', 'auto', '--epochs', str(latest + 1)], tmp, env, 300)
        problem = _expect_files('results.json', rows=latest + 1)(tmp, again) if again.rc == 0 else None
        outcome, note = classify('ok', (), case.prog, again.rc, again.stderr, again.stdout, again.timed_out,
                                 problem=problem)
        return outcome, (f'the resume after the signal: {note}' if note else ''), _last_line(err)
    return runner


def _family_g() -> List[Case]:
    long_run = ['{python}', '{train}', *fast_argv(['--epochs', '40', '--checkpoint-keep', '50'])]
    accelerate = ['accelerate', 'launch', '-q', '--cpu', '--num_processes', '1', '--num_machines', '1',
                  '--mixed_precision', 'no', '--dynamo_backend', 'no', '{train}']
    return [
        Case('g-sigint-after-checkpoint', 'Ctrl-C after checkpoint-1: one line, checkpoints kept, --resume auto works',
             long_run, names=['checkpoint-', 'resume'], runner=_signal_runner(signal.SIGINT, 'checkpoint-1')),
        Case('g-sigterm-after-checkpoint',
             'kill (SIGTERM) after checkpoint-1: one line, checkpoints kept, resume works',
             long_run, names=['checkpoint-', 'resume'], runner=_signal_runner(signal.SIGTERM, 'checkpoint-1')),
        Case('g-sigint-twice', 'Ctrl-C twice (an impatient user) after checkpoint-1: one line, checkpoints kept',
             long_run, names=['checkpoint-'], runner=_signal_runner(signal.SIGINT, 'checkpoint-1', twice=True)),
        Case('g-sigterm-first-epoch', 'kill (SIGTERM) in the first epoch: one line, exit 143', long_run, names=[],
             runner=_signal_runner(signal.SIGTERM, 'config.yaml', resume=False)),
        Case('g-sigint-at-startup', 'Ctrl-C 3 s after the start (imports): one line, exit 130', long_run, names=[],
             runner=_signal_runner(signal.SIGINT, '3', resume=False)),
        Case('g-accelerate-q-config', 'accelerate launch -q (every option given) train_moex.py --epochs 0',
             [*accelerate, *fast_argv(['--epochs', '0'])], names=['epochs', '0']),
        Case('g-accelerate-q-readme-form', "accelerate launch -q train_moex.py --epochs 0 (the README's form; the "
             "launcher's notice about its defaults left out)", ['accelerate', 'launch', '-q', '{train}',
                                                               *fast_argv(['--epochs', '0'])],
             names=['epochs', '0'], ignore=ACCELERATE_NOTICE),
        Case('g-accelerate-q-data', 'accelerate launch -q with a missing ImageFolder',
             [*accelerate, *fast_argv(['--dataset', 'imagefolder', '--data-dir', '{tmp}/nodata', '--img-size', '32'])],
             names=['nodata']),
        Case('g-accelerate-q-resume-mismatch', 'accelerate launch -q --resume auto with another model',
             [*accelerate, *fast_argv(_resume('--model', 'resnet14t', '--epochs', '3'))], names=['resnet14t'],
             needs=('run',), watch=True),
        Case('g-accelerate-q-ok', 'accelerate launch -q of a good run', [*accelerate, *fast_argv([])], expect='ok',
             check=_expect_files('results.json')),
    ]


# ---------------------------------------------------------------------------------------------
# Running the cases
def skip_reason(case: Case, fx: Fixtures) -> Optional[str]:
    if 'timm' in case.needs and not fx.timm_train:
        return f'set {TIMM_TRAIN_ENV} to timm\'s train.py to run it'
    if 'setpriv' in case.needs and os.geteuid() == 0 and not shutil.which('setpriv'):
        return 'as root, a read-only folder needs setpriv (util-linux) to be read-only'
    if 'run' in case.needs and fx.base_run is None:
        return f'the base run failed: {fx.base_failed or "not run"}'
    return None


def run_case(case: Case, fx: Fixtures, workdir: Path) -> Result:
    """Set up, run and classify one command-line case."""
    reason = skip_reason(case, fx)
    if reason:
        return Result(case.id, SKIPPED, reason, display(case))
    tmp = Path(tempfile.mkdtemp(prefix=f'{case.id}-', dir=workdir))
    if 'run' in case.needs:
        shutil.copytree(fx.base_run, tmp / 'myrun')
    cleanup = None
    try:
        if case.setup is not None:
            cleanup = case.setup(tmp, fx)
        if case.runner is not None:
            start = time.perf_counter()
            outcome, note, last = case.runner(case, tmp, fx)
            return Result(case.id, outcome, note, display(case), last, time.perf_counter() - start)
        before = snapshot(tmp / 'myrun') if case.watch else {}
        env = _env({k: (v.replace('{tmp}', str(tmp)) if v else v) for k, v in case.env.items()})
        run = execute(substitute(case.cmd, tmp, fx), tmp, env, case.timeout)
    except Exception as e:  # noqa: BLE001  a broken case is the probe's bug: say so, go on
        return Result(case.id, 'unclear', f'the probe failed to run the case: {type(e).__name__}: {e}', display(case))
    finally:
        if callable(cleanup):
            cleanup()
    problem = None
    if not run.timed_out:
        check = case.check if run.rc == 0 else case.check_error
        if check is not None:
            try:
                problem = check(tmp, run)
            except Exception as e:  # noqa: BLE001  a record that cannot be read is what is wrong
                problem = f'cannot read what the run recorded ({type(e).__name__}: {str(e)[:120]})'
    outcome, note = classify(case.expect, case.names, case.prog, run.rc, run.stderr, run.stdout, run.timed_out,
                             lost_files(before, tmp / 'myrun') if case.watch else (), problem, case.codes, case.ignore)
    if case.id == 'b-base-run':
        if outcome == 'good':
            fx.base_run = tmp / 'myrun'
        else:
            fx.base_failed = f'{outcome}: {note or _last_line(run.stderr)}'[:200]
    return Result(case.id, outcome, note, display(case), _last_line(run.stderr), run.seconds)


def run_api_cases(cases: List[Case], fx: Fixtures, workdir: Path, timeout: float = 60) -> List[Result]:
    """Family e in one worker process (one import of torch), each call under its own alarm."""
    tmp = Path(tempfile.mkdtemp(prefix='api-', dir=workdir))
    out = tmp / 'results.jsonl'
    cmd = [sys.executable, str(Path(__file__).resolve()), '--api-worker', ','.join(c.id for c in cases),
           '--api-out', str(out), '--api-timeout', str(timeout)]
    run = execute(cmd, tmp, _env({}), 120 + timeout * len(cases))
    records = {}
    if out.is_file():
        for line in out.read_text().splitlines():
            record = json.loads(line)
            records[record['id']] = record
    results = []
    for case in cases:
        record = records.get(case.id)
        if record is None:
            note = 'the API worker ' + ('timed out' if run.timed_out else f'died (exit {run.rc}): '
                                        f'{_last_line(run.stderr)}')
            results.append(Result(case.id, 'hang' if run.timed_out else 'traceback', note, case.what))
            continue
        problem = tuple(record['problem']) if isinstance(record['problem'], list) else record['problem']
        outcome, note = classify_api(case.expect, case.names, record['exc_type'], record['message'], problem,
                                     record['timed_out'], case.types)
        last = f'{record["exc_type"]}: {(record["message"].strip().splitlines() or [""])[0]}' \
            if record['exc_type'] else ''
        results.append(Result(case.id, outcome, note, case.what, last[:240], record['seconds']))
    return results


def select(cases: List[Case], families: Optional[str], only: Optional[str]) -> List[Case]:
    chosen = cases
    if families:
        wanted = set(families.replace(' ', '').split(','))
        unknown = wanted - set(FAMILIES)
        if unknown:
            raise SystemExit(f'misuse_probe.py: unknown family {", ".join(sorted(unknown))}; families: '
                             f'{", ".join(FAMILIES)}')
        chosen = [c for c in chosen if c.family in wanted]
    if only:
        patterns = [p for p in only.replace(' ', '').split(',') if p]
        chosen = [c for c in chosen if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
        if not chosen:
            raise SystemExit(f'misuse_probe.py: no case matches --only {only!r} (see --list)')
    return chosen


def run_all(cases: List[Case], fx: Fixtures, workdir: Path, jobs: int, log: Callable[[str], None],
            verbose: bool = False) -> List[Result]:
    """The base run and the cases that do not need it first, then those that do; ``jobs`` at a time."""
    all_cases = {c.id: c for c in build_cases()}
    todo = list(cases)
    if any('run' in c.needs for c in todo) and 'b-base-run' not in {c.id for c in todo}:
        todo.insert(0, all_cases['b-base-run'])
    if any('weights' in c.needs for c in todo):
        log('making the weight files of family c ...')
        make_weights(fx.root / 'weights')
    api = [c for c in todo if c.api is not None]
    first = [c for c in todo if c.api is None and 'run' not in c.needs]
    first.sort(key=lambda c: c.id != 'b-base-run')  # the base run starts first
    later = [c for c in todo if c.api is None and 'run' in c.needs]
    results: List[Result] = []
    total = len(todo)

    def report(result: Result) -> None:
        results.append(result)
        note = f'  {result.note[:150]}' if result.outcome != 'good' and result.note else ''
        if verbose and result.last_line:
            note += f'\n      {result.last_line}'
        log(f'[{len(results):>3}/{total}] {result.outcome:<9} {result.id} ({result.seconds:.0f} s){note}')

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # submitted in order: the base run, the API worker, the rest
        futures = [pool.submit(run_case, c, fx, workdir) for c in first[:1]]
        if api:
            futures.append(pool.submit(run_api_cases, api, fx, workdir))
        futures += [pool.submit(run_case, c, fx, workdir) for c in first[1:]]
        for future in as_completed(futures):
            out = future.result()
            for r in (out if isinstance(out, list) else [out]):
                report(r)
        for future in as_completed([pool.submit(run_case, c, fx, workdir) for c in later]):
            report(future.result())
    order = {c.id: i for i, c in enumerate(all_cases.values())}
    return sorted(results, key=lambda r: order[r.id])


# ---------------------------------------------------------------------------------------------
# The report
def versions() -> str:
    import accelerate
    import timm
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or 'CPU'
    return (f'device: {device} (the probe runs on the CPU); python {platform.python_version()}, torch '
            f'{torch.__version__}, timm {timm.__version__}, accelerate {accelerate.__version__}; {os.cpu_count()} '
            'CPU cores')


def totals_table(results: List[Result]) -> str:
    """A markdown table: cases per family and outcome, and the totals."""
    columns = list(OUTCOMES) + ([SKIPPED] if any(r.outcome == SKIPPED for r in results) else [])
    lines = ['| family | cases | ' + ' | '.join(columns) + ' |', '|---|---|' + '---|' * len(columns)]
    for key, title in [*FAMILIES.items(), ('', 'all')]:
        rows = [r for r in results if not key or r.family == key]
        if not rows:
            continue
        counts = [sum(r.outcome == o for r in rows) for o in columns]
        name = f'({key}) {title}' if key else '**all**'
        lines.append(f'| {name} | {len(rows)} | ' + ' | '.join(str(c) for c in counts) + ' |')
    return '\n'.join(lines)


def report_text(results: List[Result], header: List[str], cases: Dict[str, Case]) -> str:
    lines = ['# Misuse probe', '', *[f'- {h}' for h in header], '', '## Totals', '', totals_table(results), '',
             '## Cases that are not good', '']
    bad = [r for r in results if r.outcome != 'good']
    if not bad:
        lines.append('None.')
    for r in bad:
        lines += [f'### `{r.id}`: {r.outcome}', '', f'{cases[r.id].what}.', '',
                  f'- command: `{r.cmd}`' if cases[r.id].api is None else f'- call: `{r.cmd}`',
                  f'- why: {r.note}' if r.note else '- why: -',
                  f'- last line: `{r.last_line}`' if r.last_line else '- last line: (none)', '']
    return '\n'.join(lines) + '\n'


def _rmtree(path: Path) -> None:
    def writable(func, p, exc):
        os.chmod(p, stat.S_IRWXU)
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        func(p)
    shutil.rmtree(path, onerror=writable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--family', help=f'comma-separated families: {", ".join(FAMILIES)} (default: all)')
    parser.add_argument('--only', help='comma-separated case ids or shell-style patterns (b-resume-*)')
    parser.add_argument('--list', action='store_true', help='list the cases and exit')
    parser.add_argument('--jobs', type=int, default=2, help='cases run at a time (default 2)')
    parser.add_argument('--out', type=Path, help='write the report (totals, then every case that is not good) as '
                                                 'markdown to this file')
    parser.add_argument('--keep', action='store_true', help='keep the temporary folders of the cases')
    parser.add_argument('-v', '--verbose', action='store_true', help="print each case's last line on stderr")
    parser.add_argument('--api-worker', help=argparse.SUPPRESS)
    parser.add_argument('--api-out', type=Path, help=argparse.SUPPRESS)
    parser.add_argument('--api-timeout', type=float, default=120, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # started in the background (nohup ... &): the commands must take Ctrl-C as they do in a terminal, and an
        # ignored signal stays ignored across exec, a handled one does not
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.api_worker:
        api_worker(args.api_worker.split(','), args.api_out, args.api_timeout)
        return
    cases = select(build_cases(), args.family, args.only)
    if args.list:
        for c in cases:
            print(f'{c.id:<36} {c.what}')
        print(f'{len(cases)} cases')
        return
    if args.jobs < 1:
        raise SystemExit(f'misuse_probe.py: --jobs must be at least 1, got {args.jobs}')
    started = time.perf_counter()
    command = 'python benchmarks/misuse_probe.py ' + shlex.join(sys.argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix='misuse_probe_'))
    fx = Fixtures(workdir / 'fx', timm_train=os.environ.get(TIMM_TRAIN_ENV) or None)
    log = lambda text: print(text, flush=True)  # noqa: E731
    log(f'command: {command}')
    log(f'{len(cases)} cases, {args.jobs} at a time, in {workdir}')
    if fx.timm_train is None:
        log(f'note: {TIMM_TRAIN_ENV} is unset, so the cases of family f that need timm\'s train.py are skipped')
    make_image_folder(fx.images)
    make_image_folder(fx.root / 'many', per_class=(110, 2))
    try:
        results = run_all(cases, fx, workdir, args.jobs, log, args.verbose)
    finally:
        if not args.keep:
            _rmtree(workdir)
    minutes = (time.perf_counter() - started) / 60
    header = [f'command: `{command}`', versions(), f'date: {date.today().isoformat()}; {minutes:.0f} minutes, '
              f'{args.jobs} cases at a time', 'outcomes: ' + ', '.join(OUTCOMES) + ' (see the script\'s docstring)']
    if fx.timm_train is None:
        header.append(f'{TIMM_TRAIN_ENV} unset: the cases of family f that need timm\'s train.py were skipped')
    print()
    for h in header:
        print(h)
    print()
    print(totals_table(results))
    bad = [r for r in results if r.outcome != 'good']
    if bad:
        print('\nnot good:')
        for r in bad:
            print(f'  {r.outcome:<9} {r.id}: {r.note[:160]}')
    if args.out:
        args.out.write_text(report_text(results, header, {c.id: c for c in build_cases()}))
        print(f'\nreport: {args.out}')


if __name__ == '__main__':
    main()
