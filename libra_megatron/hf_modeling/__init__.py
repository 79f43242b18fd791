"""hf_modeling"""
