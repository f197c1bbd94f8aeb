"""Jobs that read the database and call the trainer (batch retraining)."""
