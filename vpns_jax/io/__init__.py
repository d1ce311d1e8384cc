"""What goes to and comes from disk: checkpoints and array files, metrics, torchvision weights, exported subnetworks."""
