"""Authorization: policies compiled at config time into fast per-connection decisions."""
