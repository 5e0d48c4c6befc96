"""Quality of generated images: the encoders (`encoders`) and the metrics over them (`metrics`)."""
