"""Datasets and preprocessing for training and synthesis.

* :mod:`~phmdiff_cli.data.layouts` - find subjects in SynthRAD / BraTS / nnU-Net folders or a CSV manifest
* :mod:`~phmdiff_cli.data.summary` - subjects, modalities, sizes and spacings from image headers
* :mod:`~phmdiff_cli.data.normalize` - intensities to the model range [-1, 1] and back
* :mod:`~phmdiff_cli.data.grid` - the model's in-plane grid, with an exact recorded inverse
* :mod:`~phmdiff_cli.data.preprocess` - file -> model-grid slices -> file, shared by training and synthesis
* :mod:`~phmdiff_cli.data.cache` - preprocessed subjects as memory-mapped float16 arrays
* :mod:`~phmdiff_cli.data.slices` - pairs, 2.5D source stack, weighted slice sampling, augmentation, split

Import submodules explicitly (``from phmdiff_cli.data.slices import SliceDataset``): light users then do not
pay for torch.
"""
