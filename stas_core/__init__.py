"""Spiking transformer core: neurons, models, data, training and energy accounting."""
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
