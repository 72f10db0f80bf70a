"""benchmarks/misuse_probe.py: its classifier on made-up outcomes, and its list of cases (the probe itself is too
slow for the suite)."""
import pytest

from helpers import load_benchmark

PROG = 'train_moex.py'
TRACEBACK = ('Traceback (most recent call last):\n  File "train_moex.py", line 10, in <module>\n    main()\n'
             "ValueError: could not convert string to float: 'abc'\n")
CLEAN = "train_moex.py: configuration error: lr: expected a number or null, got 'abc' (str)\n"


@pytest.fixture(scope='module')
def probe():
    return load_benchmark('misuse_probe')


def test_classify_command_outcomes(probe):
    classify = probe.classify
    assert classify('error', ['lr', 'abc'], PROG, rc=2, stderr=CLEAN) == ('good', '')
    assert classify('error', ['lr'], PROG, rc=1, stderr=TRACEBACK)[0] == 'traceback'
    # a success where an error was expected, with or without a record of it
    assert classify('error', ['lr'], PROG, rc=0, stderr='')[0] == 'silent'
    assert classify('either', ['fp16'], PROG, rc=0, stderr='', problem='records fp16')[0] == 'silent'
    # one clean line that does not name the bad value
    outcome, note = classify('error', ['lr', '-0.5'], PROG, rc=2, stderr='train_moex.py: a value is wrong\n')
    assert outcome == 'unclear' and "'lr'" in note and "'-0.5'" in note
    # more than the one line, a line of another program, another exit code than the README's
    assert classify('error', ['lr'], PROG, rc=2, stderr='UserWarning: x\n' + CLEAN)[0] == 'unclear'
    assert classify('error', ['lr'], PROG, rc=2, stderr="lr: expected a number, got 'abc'\n")[0] == 'unclear'
    assert classify('error', ['lr'], PROG, rc=1, stderr=CLEAN, codes=(2,))[0] == 'unclear'
    # killed by SIGINT after its line: the shell shows 130
    assert classify('error', [], PROG, rc=-2, stderr='train_moex.py: interrupted\n', codes=(130,)) == ('good', '')
    # a launcher's own notice can be left out
    notice = 'The following values were not passed to `accelerate launch` and had defaults used instead:\n'
    assert classify('error', ['lr'], PROG, rc=1, stderr=notice + CLEAN, ignore=probe.ACCELERATE_NOTICE)[0] == 'good'
    # '-' and '_' alike, any case
    assert classify('error', ['moex-prob'], PROG, rc=2, stderr='train_moex.py: MOEX_PROB: must be in [0, 1]\n')[0] == \
        'good'
    # a success: right, wrongly recorded, refused
    assert classify('ok', (), PROG, rc=0, stderr='') == ('good', '')
    assert classify('ok', (), PROG, rc=0, stderr='', problem='results.json is missing')[0] == 'silent'
    assert classify('ok', (), PROG, rc=2, stderr=CLEAN)[0] == 'unclear'
    # lost files and timeouts come first
    assert classify('error', ['lr'], PROG, rc=2, stderr=CLEAN, lost=['config.yaml is gone'])[0] == 'data_lost'
    assert classify('error', ['lr'], PROG, rc=None, stderr='', timed_out=True)[0] == 'hang'


def test_classify_api_outcomes(probe):
    classify = probe.classify_api
    assert classify('error', ['perm'], 'ValueError', 'perm must be a permutation of 0..3; got [0, 9]') == ('good', '')
    assert classify('error', ['perm'], 'IndexError', 'index 9 is out of bounds for dimension 0')[0] == 'unclear'
    assert classify('error', ['perm'], 'AttributeError', "'list' object has no attribute 'perm'")[0] == 'traceback'
    assert classify('error', ['eps'], None)[0] == 'silent'
    assert classify('either', ['logits'], None, problem='a finite result from a NaN input')[0] == 'silent'
    assert classify('ok', (), 'ValueError', 'x')[0] == 'traceback'
    assert classify('ok', (), None) == ('good', '')
    assert classify('error', ['eps'], 'OSError', 'eps: disk full')[0] == 'unclear'


def test_lost_files(probe, tmp_path):
    (tmp_path / 'config.yaml').write_text('epochs: 2\n')
    (tmp_path / 'results.json').write_text('{"epochs": 2}')
    before = probe.snapshot(tmp_path)
    assert probe.lost_files(before, tmp_path) == []
    (tmp_path / 'config.yaml').unlink()
    (tmp_path / 'results.json').write_text('{"epo')
    lost = probe.lost_files(before, tmp_path)
    assert len(lost) == 2 and 'config.yaml is gone' in lost[0] and 'results.json is half-written' in lost[1]


def test_cases(probe):
    cases = probe.build_cases()
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids) >= 150
    assert len({(tuple(c.cmd), c.what) for c in cases}) == len(cases)  # no case twice under another id
    assert {c.family for c in cases} == set(probe.FAMILIES)
    for c in cases:
        assert c.expect in ('error', 'ok', 'either'), c.id
        assert (c.api is None) != (not c.cmd), c.id  # a command or an API call
        assert c.expect == 'ok' or c.names or c.codes or c.runner or c.check_error, c.id
