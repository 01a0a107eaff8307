"""Networks of SAR: the generator, the discriminator and the feature extractor of the content loss."""
