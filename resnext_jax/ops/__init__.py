"""The ops behind every layer of the model (convolutions, max pool, batch-norm
statistics), each in several implementations chosen by one name (`impl.py`)."""
