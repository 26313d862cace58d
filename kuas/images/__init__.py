"""Images in and out: robust loading, PNG saving with A1111 infotext, the invisible watermark."""
