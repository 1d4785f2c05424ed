"""The bureau registry: who may report for which bureau (codes, PIN hashes, caller ids, pen serials)."""

from registry.bureaux import Bureau, Registry, RegistryError, RegistryFile, load_registry
from registry.pins import hash_pin, verify_pin

__all__ = ["Bureau", "Registry", "RegistryError", "RegistryFile", "hash_pin", "load_registry", "verify_pin"]
