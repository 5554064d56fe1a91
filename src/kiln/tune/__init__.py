"""Selection among the choices of each kernel spec, with a persistent timing cache."""

from kiln.tune.cache import TimingCache
from kiln.tune.select import Selection, Tuner

__all__ = ["Selection", "TimingCache", "Tuner"]
