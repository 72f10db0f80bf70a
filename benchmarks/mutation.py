"""Mutation score of the library's algorithm modules, with mutmut (not part of CI: too slow).

mutmut changes one operator, constant or call at a time in the modules that ``[tool.mutmut]`` of
pyproject.toml lists (``only_mutate``) and runs the tests that cover the changed function; a mutant
that no test notices "survives". This script runs mutmut one module at a time (so each run stays
short and a module's score can be redone alone) and prints a table of killed / survived per module
and the surviving mutants.

    pip install mutmut==3.8.1
    python benchmarks/mutation.py                  # every module in only_mutate
    python benchmarks/mutation.py loss.moex ops.moex   # some of them (names below timm_moex)
    python benchmarks/mutation.py --survivors ops.moex # only the survivors of the last run (after new tests)
    python benchmarks/mutation.py --report         # the table of the last runs, running nothing

mutmut works in ``mutants/`` (a copy of the project; git-ignored) and keeps its results there, so
``--report`` and ``python -m mutmut show NAME`` read the last runs.
"""
import argparse
import collections
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def mutmut_config(root: Path = ROOT) -> dict:
    """The ``[tool.mutmut]`` table of pyproject.toml."""
    return tomllib.loads((root / 'pyproject.toml').read_text())['tool']['mutmut']


def configured_modules(config: dict) -> list:
    """Dotted module names of the files in ``only_mutate`` (``timm_moex/loss/moex.py`` -> ``timm_moex.loss.moex``)."""
    return [path[:-len('.py')].replace('/', '.') for path in config['only_mutate']]


def parse_results(text: str) -> dict:
    """{module: {mutant name: status}} from ``mutmut results --all true``."""
    by_module = collections.defaultdict(dict)
    for line in text.splitlines():
        # functions are named MODULE.x_NAME__mutmut_N, methods MODULE.xǁCLASSǁNAME__mutmut_N
        match = re.match(r'\s*((\S+?)\.x[ǁ_]\S*__mutmut_\d+):\s*(.+?)\s*$', line)
        if match:
            by_module[match.group(2)][match.group(1)] = match.group(3)
    return by_module


def mutmut_results() -> dict:
    """{module: {mutant name: status}} of every mutant mutmut knows, from its files in ``mutants/``."""
    return parse_results(subprocess.run([sys.executable, '-m', 'mutmut', 'results', '--all', 'true'], cwd=ROOT,
                                        check=True, capture_output=True, text=True).stdout)


def merge_rerun(previous: dict, rerun: dict) -> dict:
    """The statuses of a re-run of survivors laid over those of the runs before it.

    mutmut marks every mutant 'not checked' when it finds tests it has not seen, so after a
    re-run its own results hold only the mutants that were re-run.

    Args:
        previous: {module: {mutant name: status}} before the re-run.
        rerun: The same after it.

    Returns:
        {module: {mutant name: status}}: the re-run's statuses where it checked the mutant,
        the previous ones elsewhere.
    """
    merged = {module: dict(statuses) for module, statuses in previous.items()}
    for module, statuses in rerun.items():
        merged.setdefault(module, {}).update((n, s) for n, s in statuses.items() if s != 'not checked')
    return merged


def changed_modules(modules: list, root: Path = ROOT) -> list:
    """The modules whose source is newer than mutmut's copy of it in ``mutants/`` (or that it has no copy of).

    mutmut makes such a module's mutants anew, numbered anew, so the survivors of its last run
    name other mutants.
    """
    def source(module, base):
        return base / (module.replace('.', '/') + '.py')

    return [m for m in modules if not source(m, root / 'mutants').is_file()
            or source(m, root).stat().st_mtime > source(m, root / 'mutants').stat().st_mtime]


def table(by_module: dict, modules: list) -> str:
    """Markdown rows: module, mutants, killed, timeout, survived, other, score.

    A mutant that makes a test hang (timeout) is caught as surely as one that makes a test fail, so
    the score is (killed + timeout) / checked, as mutmut's own badge counts it. mutmut makes the
    mutants of every configured module on its first run; those of a module not run yet are 'not
    checked' and count in no column but their own note.
    """
    rows = ['| module | mutants | killed | timeout | survived | other | score |', '|---|---|---|---|---|---|---|']
    for module in modules:
        statuses = collections.Counter(by_module.get(module, {}).values())
        unchecked = statuses.pop('not checked', 0)
        total = sum(statuses.values())
        if not total:
            rows.append(f'| `{module}` | not run | | | | | |')
            continue
        caught = statuses['killed'] + statuses['timeout']
        other = str(total - caught - statuses['survived'])
        if unchecked:
            other += f' (+{unchecked} not checked)'
        rows.append(f"| `{module}` | {total} | {statuses['killed']} | {statuses['timeout']} | {statuses['survived']} | "
                    f"{other} | {100.0 * caught / total:.1f} % |")
    return '\n'.join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('modules', nargs='*', help='names below timm_moex (loss.moex) or full dotted ones; default: only_mutate')
    parser.add_argument('--report', action='store_true', help='print the table of the last runs, run nothing')
    parser.add_argument('--max-children', type=int, default=None,
                        help='parallel mutant workers (default: mutmut takes the CPU count)')
    parser.add_argument('--survivors', action='store_true',
                        help="re-run only the survivors of each module's last run (after writing tests for them)")
    args = parser.parse_args(argv)
    configured = configured_modules(mutmut_config())
    wanted = [m if m.startswith('timm_moex.') else f'timm_moex.{m}' for m in args.modules] or configured
    unknown = [m for m in wanted if m not in configured]
    if unknown:
        parser.error(f'{", ".join(unknown)} not in [tool.mutmut] only_mutate of pyproject.toml: {", ".join(configured)}')
    rerun_survivors = args.survivors and not args.report
    if rerun_survivors:
        changed = changed_modules(wanted)
        if changed:
            short = ' '.join(m[len('timm_moex.'):] for m in changed)
            parser.error(f'{", ".join(changed)} changed since the last mutation run, so the survivors it names are '
                         f'other mutants now; run the whole module: python benchmarks/mutation.py {short}')
    # the statuses a re-run of survivors is laid over
    previous = mutmut_results() if rerun_survivors else {}
    if not args.report:
        # one torch thread per mutant worker: more would only fight over the same cores
        children = args.max_children or os.cpu_count() or 1
        env = {**os.environ, 'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 1) // children))}
        for module in wanted:
            # a name pattern re-runs every mutant it matches, whatever its last result; a mutant that no test
            # reached survives as surely as one that every test passed
            names = sorted(n for n, s in previous.get(module, {}).items() if s in ('survived', 'no tests')) \
                if args.survivors else [f'{module}.*']
            if not names:
                print(f'# {module}: no survivors to re-run', flush=True)
                continue
            options = ['--max-children', str(args.max_children)] if args.max_children else []
            log = ROOT / 'mutants' / f'{module}.log'
            log.parent.mkdir(exist_ok=True)
            shown = f'<the {len(names)} survivors of {module}>' if args.survivors else shlex.quote(names[0])
            print('$ python -m mutmut run', shown, *options, f'> {log.relative_to(ROOT)}', flush=True)
            start = time.monotonic()
            with log.open('w') as out:
                subprocess.run([sys.executable, '-m', 'mutmut', 'run', *names, *options], cwd=ROOT, check=True,
                               stdout=out, stderr=subprocess.STDOUT, env=env)
            print(f'# {module}: {time.monotonic() - start:.0f} s wall', flush=True)
    by_module = merge_rerun(previous, mutmut_results())
    mutmut_version = subprocess.run([sys.executable, '-m', 'mutmut', '--version'], capture_output=True,
                                    text=True).stdout.strip()
    print(f'# {platform.platform()}, python {platform.python_version()}, torch {torch.__version__}, {mutmut_version}')
    print(f'# command: python benchmarks/mutation.py {shlex.join(sys.argv[1:] if argv is None else argv)}'.rstrip())
    print(table(by_module, wanted))
    for module in wanted:
        survived = sorted(n for n, s in by_module.get(module, {}).items() if s == 'survived')
        if survived:
            print(f'\nsurvived in {module}:', *survived, sep='\n  ')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
