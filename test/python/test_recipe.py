"""Tests of models/recipe pieces that the bundle depends on."""
import torch

from models.dit import DiT
from models.presets import get_preset
from models.recipe.generation import folded

torch.set_num_threads(1)


def test_folded_dit_takes_raw_query_states():
    """Training feeds the DiT standardised query states; the bundle's DiT, with the standardisation folded
    into caption_projection, must give the same velocities on raw states (the runtime has no extra step),
    including the all-zeros unconditional branch."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").dit
    dit = DiT(cfg).eval()
    mu, sd = torch.randn(cfg.caption_dim), torch.rand(cfg.caption_dim) + 0.05
    x, t = torch.randn(2, cfg.tokens, cfg.channels), torch.tensor([900.0, 30.0])
    for c in (torch.randn(2, 64, cfg.caption_dim) * 4 + 2, torch.zeros(2, 64, cfg.caption_dim)):
        with torch.no_grad():
            torch.testing.assert_close(folded(dit, mu, sd)(x, t, c), dit(x, t, (c - mu) / sd), rtol=1e-4, atol=1e-4)
    assert not torch.equal(folded(dit, mu, sd).caption_projection.weight, dit.caption_projection.weight)


def test_frozen_conditions_match_the_backbone():
    """While the queries are frozen the generation stage reuses each caption's query states; they must be
    what the backbone gives that caption (up to rounding), in the batch's order, repeats included."""
    from models.backbone import Backbone
    from models.recipe import data
    from models.recipe.generation import Conditions, condition, follow_up_queries

    torch.manual_seed(0)
    p = get_preset("tiny")
    tok = data.tokenizer(p.backbone.vocab, p.backbone.context)
    bb = Backbone(p.backbone, p.vision).eval()
    bb.queries.data.copy_(follow_up_queries(bb, tok))
    captions = ["two red squares on a black background", "a small blue circle at the top on a white background"]
    frozen = Conditions(bb, tok)
    for batch in (captions, captions[::-1] + captions[:1]):
        with torch.no_grad():
            want = condition(bb, [data.generation_ids(tok, c) for c in batch])
        torch.testing.assert_close(frozen.get(batch), want, rtol=1e-5, atol=1e-5)


def test_follow_up_prefix_is_the_generation_prompt():
    """The follow-up task trains the LM on exactly the states the query tokens will read: its sequence
    starts with the generation prompt, and its loss covers only the answer."""
    from models.recipe import data

    p = get_preset("tiny")
    tok = data.tokenizer(p.backbone.vocab, p.backbone.context)
    caption = "a large red square at the center on a gray background"
    ids, start = data.follow_up_ids(tok, caption, "what shape is it?", "square")
    prompt = data.generation_ids(tok, caption)
    assert ids[:len(prompt)] == prompt
    assert tok.decode(ids[start:]) == "square<|im_end|>"


def test_vision_stage_leaves_the_lm_as_it_was(monkeypatch):
    """The vision stage trains the vision tower alone: every LM weight, and so every generation prompt's
    query states that the DiT was trained on, must come out bit-identical."""
    from models.recipe import common, understanding

    saved = {}
    monkeypatch.setattr(common, "save", lambda name, state: saved.update(state))
    understanding.train("vision-test", steps=2, batch_size=4, lr=1e-2, start="ground", cells=1.0, vision_only=True)
    before = common.load("ground")["backbone"]
    after = saved["backbone"]
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))


def test_questions_stage_trains_the_lm_alone_and_leaves_the_queries_to_generation(monkeypatch):
    """The questions stage trains the LM only: the vision tower must come out bit-identical, and the
    checkpoint must not carry queries (the bundle takes them from the generation stage)."""
    from models.recipe import common, questions

    saved = {}
    monkeypatch.setattr(common, "save", lambda name, state: saved.update(state))
    questions.train(steps=2, batch_size=4, distill_rows=2, lr=1e-2)
    before = common.load("vision2")["backbone"]
    after = saved["backbone"]
    assert "queries" not in after
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("visual."))
    assert any(not torch.equal(before[k], after[k]) for k in after if not k.startswith("visual."))


def test_lanes_run_side_by_side_and_a_failed_stage_stops_the_recipe(tmp_path):
    """`all` runs its lanes' stages as child processes: a stage that fails must end the recipe with an error
    (and stop the other lane) instead of letting later stages start; stages that succeed leave their
    output; a stage that needs one of another lane starts after it, and lanes that wait on each other are
    an error, not a hang."""
    import pytest
    from models.recipe.__main__ import run_lanes

    with pytest.raises(SystemExit, match="stage no-such-stage failed"):
        run_lanes([("no-such-stage",), ("bundle",)], tmp_path / "failed")
    run_lanes([("bundle",)], tmp_path / "ok")
    assert (tmp_path / "ok" / "manifest.json").exists()
    with pytest.raises(SystemExit, match="stage no-such-stage failed"):  # it waited for the bundle to finish
        run_lanes([("no-such-stage",), ("bundle",)], tmp_path / "after", needs={"no-such-stage": ("bundle",)})
    assert (tmp_path / "after" / "manifest.json").exists()
    with pytest.raises(SystemExit, match="wait on each other"):
        run_lanes([("a",), ("b",)], tmp_path / "none", needs={"a": ("b",), "b": ("a",)})


def test_swaps_exchange_exactly_the_two_words():
    """The swaps diagnostic must change only the position words it names, both ways, and nothing else."""
    from models.recipe.swaps import swapped

    c = "a small red circle at the top left on a white background"
    assert swapped(c, "left", "right") == "a small red circle at the top right on a white background"
    assert swapped(c, "top", "bottom") == "a small red circle at the bottom left on a white background"
    assert swapped(swapped(c, "left", "right"), "left", "right") == c
