"""Registers opdcore's OPD with verl when imported: name this module in VERL_USE_EXTERNAL_MODULES and verl imports
it in each of its processes (Ray workers included) before it looks the names up."""
from opdcore.integrations.verl import register

register()
