"""Local mode: run an RLHFJob manifest on one machine (`rlhfspec run`), embedded Redis included."""
