"""Agreement of our scores with a reference implementation's (pytorch-ood), shared by the detector tests."""
import numpy as np


def agree(ours, theirs, rtol=1e-5, atol=1e-5):
    from scipy.stats import spearmanr

    ours, theirs = ours.double().numpy(), np.asarray(theirs, np.float64)
    assert spearmanr(ours, theirs).statistic >= 0.999
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol)
