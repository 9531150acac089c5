"""BLIP3-o's sequential training recipe, scaled down to the shapes world (see models/recipe/__main__.py)."""
