"""ruozhi-sft studio: fine-tune a small chat model and see what the fine-tuning did."""

__version__ = "0.1.0"
