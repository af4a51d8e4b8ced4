"""A pytest plugin for the mutation round (.ci/mutants.py loads it with -p): hypothesis stops at the first
failing example instead of shrinking it, which can take minutes and changes no verdict."""
from hypothesis import Phase, settings

settings.register_profile("mutants", phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile("mutants")
