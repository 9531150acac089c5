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
