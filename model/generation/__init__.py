"""Streaming generation for the FAM language model (issue 15): see generator.py.

    from model.generation import FAMGenerator, Sampling, generate
"""

from model.generation.cache import DecodeState, LayerCache
from model.generation.generator import FAMGenerator, Generation, generate
from model.generation.sampling import Sampling, choose_next, next_token_probs

__all__ = ["DecodeState", "FAMGenerator", "Generation", "LayerCache", "Sampling", "choose_next", "generate",
           "next_token_probs"]
