"""bids_app.core.lesions."""
