"""The digital-pen channel: the signed upload API, raw storage, the OCR pipeline and the digit recognizer."""
