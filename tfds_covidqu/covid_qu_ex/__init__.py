"""covid_qu_ex dataset (TFDS `tfds new` layout): builder, file discovery (`sources`) and phantoms."""
