"""Models: backbones and pooling, the teacher's encoder, model folders and fingerprints, cross-encoders."""
