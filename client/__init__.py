"""The hospital side of fedrelapse: data checks, features, DP training, the ClientApp."""
