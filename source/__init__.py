"""LABPAL experiment runner: optimizer, models, data, configuration, training and plotting."""
