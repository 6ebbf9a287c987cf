"""The demo model's training noise (``dllm_cli.demo.noise``): masking, token corruption, loss weights."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dllm_cli.demo import tasks
from dllm_cli.demo.bpe import BPE
from dllm_cli.demo.noise import W_KEEP, Noiser, answer_pool
from dllm_cli.demo.tokenizer import train_bpe


def _noiser(corpus: list[str], merges: int, families=tasks.TASKS) -> Noiser:
    n = Noiser(BPE(train_bpe(corpus, merges)), np.empty(0, dtype=np.int64))
    n.answer_ids = answer_pool(n, 1, families)
    return n


@pytest.fixture(scope="module")
def noiser() -> Noiser:
    return _noiser(tasks.tokenizer_corpus(0, 400), 120)


@pytest.fixture(scope="module")
def phrasing_noiser() -> Noiser:
    """A tokenizer that has also seen the phrasing answers, so that their wordings mostly align token for token
    (as with the shipped tokenizer, where they all do)."""
    text = [tasks.render_target(e) for e in tasks.examples(0, 400, heldout=False, families=tasks.PHRASING_TASKS)]
    return _noiser(tasks.tokenizer_corpus(0, 400) + text, 200, tasks.CHAT_TASKS)


def test_short_family_windows_are_unchanged(noiser):
    """Stages 1 and 2 of the shipped recipe draw exactly the windows they drew when the model was trained
    (digest taken with the pre-phrasing trainer), so ``--init`` chains stay reproducible."""
    rng, h = np.random.default_rng(0), hashlib.sha256()
    for ex in tasks.examples(2, 40, heldout=False):
        full, p_len, alt = noiser.encode(ex, rng)
        assert alt is None
        for a in noiser.window(rng, full, p_len, alt):
            h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest()[:16] == "a1258395410fff55"


def test_window_noises_only_the_answer_of_one_block(noiser):
    rng = np.random.default_rng(1)
    for ex in tasks.examples(3, 60, heldout=False, families=tasks.CHAT_TASKS):
        full, p_len, alt = noiser.encode(ex, rng)
        assert len(full) % tasks.BLOCK_LENGTH == 0 and full[-1] == noiser.eos_id
        x, y, w = noiser.window(rng, full, p_len, alt)
        k0 = len(x) - tasks.BLOCK_LENGTH
        assert (y == full[:len(x)]).all()
        assert (x[:max(p_len, k0)] == full[:max(p_len, k0)]).all()  # prompt and earlier blocks stay clean
        assert (w[:max(p_len, k0)] == 0).all() and (w[max(p_len, k0):] >= W_KEEP).all()
        assert ((x != y) <= (w == 1.0)).all()  # every noised position carries full weight


def test_phrasing_corruption_uses_the_other_wording(phrasing_noiser):
    """For free-wording answers, many corrupted tokens come from another correct wording at the same position:
    the mixed words parallel decoding commits, which the model must learn to edit back."""
    rng = np.random.default_rng(2)
    from_alt = differ = paired = 0
    noiser = phrasing_noiser
    for ex in tasks.examples(4, 1500, heldout=False, families=tasks.PHRASING_TASKS):
        full, p_len, alt = noiser.encode(ex, rng)
        if alt is None:  # wordings with different token counts are not paired
            continue
        paired += 1
        assert len(alt) == len(full) and (alt[:p_len] == full[:p_len]).all()
        assert noiser.bpe.decode(alt[p_len:].tolist()).split(tasks.ROLE_END)[0] in ex.accept
        x, y, _ = noiser.window(rng, full, p_len, alt)
        hit = (x != y) & (x != noiser.mask_id) & (alt[:len(x)] != y)
        differ += int(hit.sum())
        from_alt += int((hit & (x == alt[:len(x)])).sum())
    assert paired > 200 and differ > 100 and 0.3 < from_alt / differ < 0.6, (from_alt, differ)


def test_a_wording_of_another_token_length_is_not_paired(noiser):
    """Padding must not hide a length difference: a shorter wording would pair tokens at shifted positions."""
    ex = tasks.Example("opinion", "Describe the cat.", "The cat is very nice. I like it.",
                       accept=("The cat is very nice. I like it.", "The cat is nice."))
    outcomes = set()
    for seed in range(20):
        full, _, alt = noiser.encode(ex, np.random.default_rng(seed))
        outcomes.add("none" if alt is None else "same" if (alt == full).all() else "other")
    assert outcomes == {"none", "same"}


@pytest.mark.parametrize("args,message", [
    (["--init", "/nonexistent"], "is not a checkpoint"),
    (["--extra-weight", "0"], "--extra-weight must be > 0"),
    (["--history-rate", "1.5"], "--history-rate must be in [0, 1]"),
    (["--steps", "0"], "must be at least 1"),
])
def test_train_rejects_bad_options_before_writing(tmp_path, capsys, args, message):
    """The training script (needs the [train] extra: skipped without torch) refuses bad options up front."""
    pytest.importorskip("torch")
    from dllm_cli.demo.train import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "out"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
