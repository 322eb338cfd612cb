"""Adapters that plug opdcore's OPD rewards and losses into other trainers (verl, TRL)."""
