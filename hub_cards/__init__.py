"""Model card templates; installed as the `flora_hf.hub_cards` package (see pyproject's package-dir)."""
