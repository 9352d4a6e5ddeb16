"""Limits for rendering an untrusted chat template: time, output size, loop iterations, sizes of values.

Jinja2's sandbox stops a template from reaching Python internals but not from hanging or exhausting
memory: two nested loops over `range(100000)` run 10^10 iterations, `'a' * 10**10` asks for 10 GB.
Here the parsed template is rewritten before compilation so every `for` loop iterates through a
guard (which counts iterations and checks the clock) and every `~` concatenation through a size
check; the operators that can build huge values (`*`, `**`, `+`, `%`) are intercepted and checked
before they run, and every filter and call refuses numbers larger than the output cap (widths,
repeat counts). `include`, `import` and `extends` are refused: a chat template is one self-contained
string, and loading other templates would read files.
"""

from __future__ import annotations

import contextvars
import re
import time
from dataclasses import dataclass
from functools import wraps
from typing import Any, Callable

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.visitor import NodeTransformer

LOOP_GUARD, CONCAT_GUARD = "__qwen2_onnx_loop__", "__qwen2_onnx_concat__"
FORBIDDEN_TAGS = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import",
                  nodes.Extends: "extends"}


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on one render; real chat templates render in milliseconds into a prompt that fits a context."""

    seconds: float = 2.0
    max_chars: int = 4_000_000  # about 8 times the text of a 131,072-token context
    max_iterations: int = 1_000_000  # loop iterations of one render, all loops together

    def __post_init__(self) -> None:
        if not (self.seconds > 0 and self.seconds != float("inf")) or self.max_chars < 1 or self.max_iterations < 1:
            raise ValueError(f"template limits must be positive and finite, got {self}")


class TemplateLimitExceeded(Exception):
    """A render went past one of its limits."""


@dataclass
class Budget:
    """What is left of one render's limits."""

    limits: TemplateLimits
    deadline: float
    iterations_left: int

    def spend(self) -> None:
        self.iterations_left -= 1
        if self.iterations_left < 0:
            raise TemplateLimitExceeded(f"it ran more than {self.limits.max_iterations:,} loop iterations")
        if time.monotonic() > self.deadline:
            raise TemplateLimitExceeded(f"it ran longer than {self.limits.seconds:g} s")


CURRENT: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("template_budget", default=None)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with size checks on the operators that can build huge values."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limits: TemplateLimits, **options: Any):
        super().__init__(**options)
        self.limits = limits
        self.unchecked_format = self.filters["format"]
        self.filters = {name: self.checked(f) for name, f in self.filters.items()}
        self.filters["format"] = self.checked(self.format_filter)
        self.globals.update({LOOP_GUARD: self.bounded_loop, CONCAT_GUARD: self.bounded_concat,
                             "range": self.bounded_range})

    def too_large(self, size: int, what: str) -> None:
        if size > self.limits.max_chars:
            raise TemplateLimitExceeded(f"{what} of {size:,} exceeds the output cap of {self.limits.max_chars:,}")

    def check_arguments(self, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and abs(value) > self.limits.max_chars:
                self.too_large(abs(value), "a number")
        spend()

    def check_result(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)):
            self.too_large(len(value), "a value")
        return value

    def checked(self, function: Callable) -> Callable:
        @wraps(function)  # keeps jinja's pass_context / pass_environment markers
        def call(*args: Any, **kwargs: Any) -> Any:
            self.check_arguments(args, kwargs)
            return self.check_result(function(*args, **kwargs))

        return call

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        __self.check_arguments(args, kwargs)
        return __self.check_result(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        spend()
        sized = (str, list, tuple)
        if op == "*" and isinstance(left, sized + (int,)) and isinstance(right, sized + (int,)):
            count, value = (right, left) if isinstance(left, sized) else (left, right)
            if isinstance(value, sized) and isinstance(count, int):
                self.too_large(len(value) * max(count, 0), "a repeated value")
        elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            self.too_large(max(abs(left), 1).bit_length() * right // 8, "a power's byte size")
        elif op == "+" and isinstance(left, sized) and isinstance(right, sized):
            self.too_large(len(left) + len(right), "a concatenation")
        elif op == "%" and isinstance(left, str):
            self.check_format(left)
        return self.check_result(self.binop_table[op](left, right))

    def check_format(self, text: str) -> None:
        """Refuse format strings with widths or precisions past the cap ('%999999999d', '{:>999999999}')."""
        for number in re.findall(r"\d+", text):
            if len(number) > 12 or int(number) > self.limits.max_chars:
                self.too_large(int(number[:13]), "a format width")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`'...'.format` as the sandbox wraps it, once its widths are checked."""
        wrapper = super().wrap_str_format(value)
        if wrapper is not None:
            self.check_format(value.__self__)
        return wrapper

    def format_filter(self, text: str, *args: Any, **kwargs: Any) -> str:
        self.check_format(text)
        return self.unchecked_format(text, *args, **kwargs)

    def bounded_range(self, *args: int) -> range:
        self.check_arguments(args, {})
        return safe_range(*args)  # the sandbox's own cap: 100,000 items

    def bounded_loop(self, iterable: Any) -> Any:
        for item in iterable:
            spend()
            yield item

    def bounded_concat(self, *parts: Any) -> str:
        spend()
        text = "".join(map(str, parts))
        self.too_large(len(text), "a concatenation")
        return text


def spend() -> None:
    """One step of the current render (none at compile time, when jinja folds constant expressions)."""
    budget = CURRENT.get()
    if budget is not None:
        budget.spend()


class Guards(NodeTransformer):
    """Route every loop's iterable and every `~` through the environment's guards."""

    def visit_For(self, node: nodes.For) -> nodes.For:  # noqa: N802 (jinja's visitor names)
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(LOOP_GUARD, "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:  # noqa: N802
        self.generic_visit(node)
        return nodes.Call(nodes.Name(CONCAT_GUARD, "load"), node.nodes, [], None, None, lineno=node.lineno)


def compile_bounded(environment: BoundedEnvironment, source: str) -> jinja2.Template:
    """Parse, refuse the tags that load other templates, insert the guards, compile."""
    tree = environment.parse(source)
    for kind, tag in FORBIDDEN_TAGS.items():
        found = next(tree.find_all(kind), None)
        if found is not None:
            raise jinja2.TemplateSyntaxError(f"{{% {tag} %}} is not allowed in a chat template", found.lineno)
    tree = Guards().visit(tree)
    tree.set_environment(environment)
    return environment.from_string(tree)


def render_bounded(template: jinja2.Template, limits: TemplateLimits, **variables: Any) -> str:
    """Render under `limits`, stopping at the output cap while the text is produced."""
    token = CURRENT.set(Budget(limits, time.monotonic() + limits.seconds, limits.max_iterations))
    try:
        pieces, size = [], 0
        for piece in template.generate(**variables):
            size += len(piece)
            if size > limits.max_chars:
                raise TemplateLimitExceeded(f"its output passed the cap of {limits.max_chars:,} characters")
            pieces.append(piece)
            spend()
        return "".join(pieces)
    finally:
        CURRENT.reset(token)
