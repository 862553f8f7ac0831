"""Direct-trained spiking transformer families (one file each) and their registry."""
from .registry import create_model, list_models, register_family, register_model
from .base import SpikingTransformer, TransformerBlock
from .spikformer import Spikformer
from .spikingformer import Spikingformer

__all__ = ["create_model", "list_models", "register_family", "register_model",
           "SpikingTransformer", "TransformerBlock", "Spikformer", "Spikingformer"]
