"""Training jobs: persistent records (store.py), their lifecycle on the workers (manager.py), loss plots."""
