"""Generative models (RBM, DBN, autoencoders, VAE, GAN): pure PyTorch, no Ray or MLflow."""
