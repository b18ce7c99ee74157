"""Router rows: initialisation from domain embeddings (and, later, router training and calibration)."""
