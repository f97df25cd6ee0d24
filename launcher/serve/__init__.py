"""Using a trained model: finding and rebuilding it from what a run left (trained), and the files it reads and
writes (files). `launcher/predict.py` is their command line."""
