"""model"""
from ristretto.engine.import_noise import silence_import_noise

silence_import_noise()  # before diffusers/torchao are imported (engine/import_noise.py)
