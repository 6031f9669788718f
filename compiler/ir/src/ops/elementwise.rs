//! Elementwise ops: unary maps, broadcasting binary arithmetic, comparisons and logic, Where,
//! Cast/CastLike, Clip, the variadic Sum/Max/Min/Mean, and the activations whose output has the
//! input's type.

use ndarray::{IxDyn, Zip};

use super::util::broadcast;
use super::AttrKind::*;
use super::{opt, req, Attr, EvalCx, InferCx, OpDef, MANY};
use crate::dtype::DataType;
use crate::eval::{fits, zip2, Array};
use crate::model::{Dim, TensorType};

fn same(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.same_as_input())
}

fn to_bool(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.out1(Some(DataType::Bool), cx.sh(0)))
}

/// Broadcast of every present input's shape.
fn broadcast_inputs(cx: &InferCx) -> Option<Vec<Dim>> {
    let mut s = cx.sh(0)?;
    for i in 1..cx.node.inputs.len() {
        if cx.has_input(i) {
            s = broadcast(&s, &cx.sh(i)?);
        }
    }
    Some(s)
}

fn broadcasting(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.out1(cx.dt(0), broadcast_inputs(cx)))
}

fn broadcasting_bool(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.out1(Some(DataType::Bool), broadcast_inputs(cx)))
}

fn propagate_identity(cx: &InferCx) -> Option<Vec<Dim>> {
    cx.symv(0).cloned()
}

// ---- unary ----

/// The unary maps the evaluator computes on floats.
#[derive(Clone, Copy)]
enum Unary {
    Neg,
    Abs,
    Sqrt,
    Reciprocal,
    Exp,
    Log,
    Sin,
    Cos,
    Tanh,
    Floor,
    Ceil,
    Relu,
    Sigmoid,
    Sign,
}

impl Unary {
    fn of(op: &str) -> Option<Unary> {
        use Unary::*;
        Some(match op {
            "Neg" => Neg,
            "Abs" => Abs,
            "Sqrt" => Sqrt,
            "Reciprocal" => Reciprocal,
            "Exp" => Exp,
            "Log" => Log,
            "Sin" => Sin,
            "Cos" => Cos,
            "Tanh" => Tanh,
            "Floor" => Floor,
            "Ceil" => Ceil,
            "Relu" => Relu,
            "Sigmoid" => Sigmoid,
            "Sign" => Sign,
            _ => return None,
        })
    }
}

/// A unary map on a float array (and the integer cases ONNX defines exactly).
pub(crate) fn unary(op: &str, a: &Array) -> Option<Array> {
    let u = Unary::of(op)?;
    macro_rules! un {
        ($x:expr, $t:ty) => {{
            let f: fn($t) -> $t = match u {
                Unary::Neg => |v| -v,
                Unary::Abs => |v| v.abs(),
                Unary::Sqrt => |v| v.sqrt(),
                Unary::Reciprocal => |v| 1.0 / v,
                Unary::Exp => |v| v.exp(),
                Unary::Log => |v| v.ln(),
                Unary::Sin => |v| v.sin(),
                Unary::Cos => |v| v.cos(),
                Unary::Tanh => |v| v.tanh(),
                Unary::Floor => |v| v.floor(),
                Unary::Ceil => |v| v.ceil(),
                Unary::Relu => |v| if v > 0.0 { v } else { 0.0 },
                Unary::Sigmoid => |v| 1.0 / (1.0 + (-v).exp()),
                // ONNX Sign(0) is 0 (Rust's signum gives 1).
                Unary::Sign => |v| {
                    if v > 0.0 {
                        1.0
                    } else if v < 0.0 {
                        -1.0
                    } else {
                        v
                    }
                },
            };
            $x.mapv(f)
        }};
    }
    Some(match (a, u) {
        (Array::F32(x), _) => Array::F32(un!(x, f32)),
        (Array::F64(x), _) => Array::F64(un!(x, f64)),
        (Array::I64(x), Unary::Neg) => Array::I64(x.mapv(|v| v.wrapping_neg())),
        (Array::I64(x), Unary::Abs) => Array::I64(x.mapv(|v| v.wrapping_abs())),
        (Array::I32(x), Unary::Neg) => Array::I32(x.mapv(|v| v.wrapping_neg())),
        (Array::I32(x), Unary::Abs) => Array::I32(x.mapv(|v| v.wrapping_abs())),
        _ => return None,
    })
}

fn eval_unary(cx: &EvalCx) -> Option<Vec<Array>> {
    Some(vec![unary(&cx.node.op_type, cx.x(0)?)?])
}

fn eval_identity(cx: &EvalCx) -> Option<Vec<Array>> {
    Some(vec![cx.x(0)?.clone()])
}

fn eval_not(cx: &EvalCx) -> Option<Vec<Array>> {
    match cx.x(0)? {
        Array::Bool(a) => Some(vec![Array::Bool(a.mapv(|v| !v))]),
        _ => None,
    }
}

// ---- binary ----

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Mod,
    Max,
    Min,
}

impl Binary {
    pub(crate) fn of(op: &str) -> Option<Binary> {
        use Binary::*;
        Some(match op {
            "Add" | "Sum" => Add,
            "Sub" => Sub,
            "Mul" => Mul,
            "Div" => Div,
            "Pow" => Pow,
            "Mod" => Mod,
            "Max" => Max,
            "Min" => Min,
            _ => return None,
        })
    }
}

/// ONNX integer Mod (fmod = 0): the result takes the divisor's sign. `y` is nonzero.
fn int_mod<T: num_like::Int>(x: T, y: T) -> T {
    let r = x.wrapping_rem_(y);
    if r != T::ZERO && ((r < T::ZERO) != (y < T::ZERO)) {
        r.wrapping_add_(y)
    } else {
        r
    }
}

mod num_like {
    pub trait Int: Copy + PartialOrd + PartialEq {
        const ZERO: Self;
        fn wrapping_rem_(self, o: Self) -> Self;
        fn wrapping_add_(self, o: Self) -> Self;
    }
    macro_rules! int {
        ($t:ty) => {
            impl Int for $t {
                const ZERO: Self = 0;
                fn wrapping_rem_(self, o: Self) -> Self {
                    self.wrapping_rem(o)
                }
                fn wrapping_add_(self, o: Self) -> Self {
                    self.wrapping_add(o)
                }
            }
        };
    }
    int!(i64);
    int!(i32);
}

/// Broadcasting binary arithmetic. Integer division or modulo by zero is not evaluated.
pub(crate) fn binary(op: Binary, a: &Array, b: &Array) -> Option<Array> {
    macro_rules! float {
        ($x:expr, $y:expr, $t:ty) => {{
            let f: fn($t, $t) -> $t = match op {
                Binary::Add => |x, y| x + y,
                Binary::Sub => |x, y| x - y,
                Binary::Mul => |x, y| x * y,
                Binary::Div => |x, y| x / y,
                Binary::Pow => |x, y| x.powf(y),
                Binary::Max => |x, y| {
                    if x.is_nan() || y.is_nan() {
                        <$t>::NAN
                    } else {
                        x.max(y)
                    }
                },
                Binary::Min => |x, y| {
                    if x.is_nan() || y.is_nan() {
                        <$t>::NAN
                    } else {
                        x.min(y)
                    }
                },
                Binary::Mod => return None,
            };
            zip2($x, $y, f)?
        }};
    }
    macro_rules! int {
        ($x:expr, $y:expr, $t:ty) => {{
            if matches!(op, Binary::Div | Binary::Mod) && $y.iter().any(|v| *v == 0) {
                return None;
            }
            let f: fn($t, $t) -> $t = match op {
                Binary::Add => |x, y| x.wrapping_add(y),
                Binary::Sub => |x, y| x.wrapping_sub(y),
                Binary::Mul => |x, y| x.wrapping_mul(y),
                Binary::Div => |x, y| x.wrapping_div(y),
                Binary::Mod => int_mod,
                Binary::Max => |x, y| x.max(y),
                Binary::Min => |x, y| x.min(y),
                Binary::Pow => |x, y| {
                    if y < 0 {
                        0
                    } else {
                        x.wrapping_pow(u32::try_from(y).unwrap_or(u32::MAX))
                    }
                },
            };
            zip2($x, $y, f)?
        }};
    }
    Some(match (a, b) {
        (Array::F32(x), Array::F32(y)) => Array::F32(float!(x, y, f32)),
        (Array::F64(x), Array::F64(y)) => Array::F64(float!(x, y, f64)),
        (Array::I64(x), Array::I64(y)) => Array::I64(int!(x, y, i64)),
        (Array::I32(x), Array::I32(y)) => Array::I32(int!(x, y, i32)),
        // Pow with an integer exponent on floats.
        (Array::F32(_), _) | (Array::F64(_), _) if op == Binary::Pow => {
            binary(op, a, &b.cast_to(a.dtype())?)?
        }
        _ => return None,
    })
}

fn eval_binary(cx: &EvalCx) -> Option<Vec<Array>> {
    let n = cx.node;
    if n.is("Mod") && n.attr_i("fmod").unwrap_or(0) != 0 {
        return None;
    }
    Some(vec![binary(Binary::of(&n.op_type)?, cx.x(0)?, cx.x(1)?)?])
}

fn eval_variadic(cx: &EvalCx) -> Option<Vec<Array>> {
    let op = Binary::of(&cx.node.op_type)?;
    let mut acc = cx.x(0)?.clone();
    for i in 1..cx.inputs.len() {
        acc = binary(op, &acc, cx.x(i)?)?;
    }
    Some(vec![acc])
}

/// One element of integer shape arithmetic on symbolic values.
fn sym_binary(op: &str, a: &Dim, b: &Dim) -> Dim {
    use Dim::*;
    match (op, a, b) {
        ("Add", Known(x), Known(y)) => x.checked_add(*y).map_or(Unknown, Known),
        ("Sub", Known(x), Known(y)) => x.checked_sub(*y).map_or(Unknown, Known),
        ("Mul", Known(x), Known(y)) => x.checked_mul(*y).map_or(Unknown, Known),
        // Integer Div truncates toward zero, as ONNX Runtime does.
        ("Div", Known(x), Known(y)) if *y != 0 => x.checked_div(*y).map_or(Unknown, Known),
        ("Max", Known(x), Known(y)) => Known(*x.max(y)),
        ("Min", Known(x), Known(y)) => Known(*x.min(y)),
        ("Equal", Known(x), Known(y)) => Known((x == y) as i64),
        ("Less", Known(x), Known(y)) => Known((x < y) as i64),
        ("Greater", Known(x), Known(y)) => Known((x > y) as i64),
        // Identities that keep a symbolic dim.
        ("Add" | "Sub", s @ Sym(_), Known(0)) | ("Add", Known(0), s @ Sym(_)) => s.clone(),
        ("Mul" | "Div", s @ Sym(_), Known(1)) | ("Mul", Known(1), s @ Sym(_)) => s.clone(),
        ("Equal", Sym(x), Sym(y)) if x == y => Known(1),
        // A dim is never negative.
        ("Equal", Sym(_), Known(v)) | ("Equal", Known(v), Sym(_)) if *v < 0 => Known(0),
        _ => Unknown,
    }
}

/// Elementwise over two symbolic vectors, the shorter one of length 1 broadcast.
fn propagate_binary(cx: &InferCx) -> Option<Vec<Dim>> {
    let (a, b) = (cx.symv(0)?, cx.symv(1)?);
    let len = a.len().max(b.len());
    if (a.len() != len && a.len() != 1) || (b.len() != len && b.len() != 1) {
        return None;
    }
    let at = |x: &Vec<Dim>, i: usize| x[if x.len() == 1 { 0 } else { i }].clone();
    Some(
        (0..len)
            .map(|i| sym_binary(&cx.node.op_type, &at(a, i), &at(b, i)))
            .collect(),
    )
}

// ---- comparison and logic ----

fn eval_compare(cx: &EvalCx) -> Option<Vec<Array>> {
    let (a, b) = (cx.x(0)?, cx.x(1)?);
    let op = cx.node.op_type.as_str();
    macro_rules! cmp {
        ($x:expr, $y:expr) => {{
            match op {
                "Equal" => zip2($x, $y, |x, y| x == y)?,
                "Less" => zip2($x, $y, |x, y| x < y)?,
                "Greater" => zip2($x, $y, |x, y| x > y)?,
                "LessOrEqual" => zip2($x, $y, |x, y| x <= y)?,
                "GreaterOrEqual" => zip2($x, $y, |x, y| x >= y)?,
                _ => return None,
            }
        }};
    }
    Some(vec![Array::Bool(match (a, b) {
        (Array::F32(x), Array::F32(y)) => cmp!(x, y),
        (Array::F64(x), Array::F64(y)) => cmp!(x, y),
        (Array::I64(x), Array::I64(y)) => cmp!(x, y),
        (Array::I32(x), Array::I32(y)) => cmp!(x, y),
        (Array::Bool(x), Array::Bool(y)) if op == "Equal" => zip2(x, y, |x, y| x == y)?,
        _ => return None,
    })])
}

fn eval_logic(cx: &EvalCx) -> Option<Vec<Array>> {
    let (Array::Bool(a), Array::Bool(b)) = (cx.x(0)?, cx.x(1)?) else {
        return None;
    };
    Some(vec![Array::Bool(match cx.node.op_type.as_str() {
        "And" => zip2(a, b, |p, q| p && q)?,
        "Or" => zip2(a, b, |p, q| p || q)?,
        "Xor" => zip2(a, b, |p, q| p ^ q)?,
        _ => return None,
    })])
}

// ---- Where ----

fn infer_where(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = match (cx.sh(0), cx.sh(1), cx.sh(2)) {
        (Some(a), Some(b), Some(c)) => Some(broadcast(&broadcast(&a, &b), &c)),
        _ => None,
    };
    Some(cx.out1(cx.dt(1).or(cx.dt(2)), s))
}

fn propagate_where(cx: &InferCx) -> Option<Vec<Dim>> {
    let (c, a, b) = (cx.symv(0)?, cx.symv(1)?, cx.symv(2)?);
    let len = c.len().max(a.len()).max(b.len());
    if [c.len(), a.len(), b.len()]
        .iter()
        .any(|l| *l != len && *l != 1)
    {
        return None;
    }
    let at = |x: &Vec<Dim>, i: usize| x[if x.len() == 1 { 0 } else { i }].clone();
    Some(
        (0..len)
            .map(|i| match at(c, i) {
                Dim::Known(0) => at(b, i),
                Dim::Known(_) => at(a, i),
                _ => Dim::Unknown,
            })
            .collect(),
    )
}

fn eval_where(cx: &EvalCx) -> Option<Vec<Array>> {
    let Array::Bool(c) = cx.x(0)? else {
        return None;
    };
    macro_rules! wh {
        ($a:expr, $b:expr, $v:ident) => {{
            let sh = super::util::broadcast_static(
                &super::util::broadcast_static(c.shape(), $a.shape())?,
                $b.shape(),
            )?;
            if !fits(&sh) {
                return None;
            }
            let (cv, av, bv) = (
                c.broadcast(IxDyn(&sh))?,
                $a.broadcast(IxDyn(&sh))?,
                $b.broadcast(IxDyn(&sh))?,
            );
            Array::$v(Zip::from(&cv).and(&av).and(&bv).map_collect(|c, a, b| {
                if *c {
                    a.clone()
                } else {
                    b.clone()
                }
            }))
        }};
    }
    Some(vec![match (cx.x(1)?, cx.x(2)?) {
        (Array::F32(a), Array::F32(b)) => wh!(a, b, F32),
        (Array::F64(a), Array::F64(b)) => wh!(a, b, F64),
        (Array::I64(a), Array::I64(b)) => wh!(a, b, I64),
        (Array::I32(a), Array::I32(b)) => wh!(a, b, I32),
        (Array::Bool(a), Array::Bool(b)) => wh!(a, b, Bool),
        _ => return None,
    }])
}

// ---- Cast ----

fn cast_target(n: &crate::model::Node) -> Option<DataType> {
    n.attr_i("to")
        .and_then(|c| i32::try_from(c).ok())
        .and_then(|c| DataType::from_code(c, "").ok())
}

fn check_cast(n: &crate::model::Node) -> Result<(), String> {
    match n.attr_i("to") {
        Some(c) if cast_target(n).is_none() => Err(format!("Cast to unknown element type {c}")),
        _ => Ok(()),
    }
}

fn infer_cast(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.out1(cast_target(cx.node), cx.sh(0)))
}

fn propagate_cast(cx: &InferCx) -> Option<Vec<Dim>> {
    let to = cast_target(cx.node)?;
    (to.is_integer() || to == DataType::Bool)
        .then(|| cx.symv(0).cloned())
        .flatten()
}

fn eval_cast(cx: &EvalCx) -> Option<Vec<Array>> {
    Some(vec![cx.x(0)?.cast_to(cast_target(cx.node)?)?])
}

fn infer_cast_like(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.out1(cx.dt(1), cx.sh(0)))
}

fn eval_cast_like(cx: &EvalCx) -> Option<Vec<Array>> {
    Some(vec![cx.x(0)?.cast_to(cx.x(1)?.dtype())?])
}

fn infer_dropout(cx: &InferCx) -> Option<Vec<TensorType>> {
    let mut v = cx.same_as_input();
    if v.len() > 1 {
        v[1] = TensorType {
            dtype: Some(DataType::Bool),
            shape: cx.sh(0),
        };
    }
    Some(v)
}

fn infer_isinf(cx: &InferCx) -> Option<Vec<TensorType>> {
    to_bool(cx)
}

const fn unary_op(name: &'static str) -> OpDef {
    OpDef::new(name, (1, 1), (1, 1), &[])
        .infer(same)
        .broadcasting()
}

const fn unary_eval(name: &'static str) -> OpDef {
    unary_op(name).eval(eval_unary)
}

const ALPHA: &[Attr] = &[opt("alpha", Float)];
const BINARY: (usize, usize) = (2, 2);

const fn binary_op(name: &'static str) -> OpDef {
    OpDef::new(name, BINARY, (1, 1), &[])
        .infer(broadcasting)
        .broadcasting()
}

const fn compare_op(name: &'static str) -> OpDef {
    OpDef::new(name, BINARY, (1, 1), &[])
        .infer(broadcasting_bool)
        .broadcasting()
        .eval(eval_compare)
}

pub(super) const OPS: &[OpDef] = &[
    OpDef::new("Identity", (1, 1), (1, 1), &[])
        .infer(same)
        .propagate(propagate_identity)
        .eval(eval_identity),
    unary_eval("Neg"),
    unary_eval("Abs"),
    unary_eval("Sqrt"),
    unary_eval("Reciprocal"),
    unary_eval("Exp"),
    unary_eval("Log"),
    unary_eval("Sin"),
    unary_eval("Cos"),
    unary_eval("Tanh"),
    unary_eval("Floor"),
    unary_eval("Ceil"),
    unary_eval("Relu"),
    unary_eval("Sigmoid"),
    unary_eval("Sign"),
    unary_op("Erf"),
    unary_op("Tan"),
    unary_op("Asin"),
    unary_op("Acos"),
    unary_op("Atan"),
    unary_op("Sinh"),
    unary_op("Cosh"),
    unary_op("Round"),
    unary_op("Softplus"),
    unary_op("Softsign"),
    unary_op("Mish"),
    unary_op("HardSwish"),
    unary_op("BitwiseNot"),
    OpDef::new("Gelu", (1, 1), (1, 1), &[opt("approximate", Str)]).infer(same),
    OpDef::new("LeakyRelu", (1, 1), (1, 1), ALPHA).infer(same),
    OpDef::new("Elu", (1, 1), (1, 1), ALPHA).infer(same),
    OpDef::new("Celu", (1, 1), (1, 1), ALPHA).infer(same),
    OpDef::new("ThresholdedRelu", (1, 1), (1, 1), ALPHA).infer(same),
    OpDef::new("Swish", (1, 1), (1, 1), ALPHA).infer(same),
    OpDef::new(
        "Selu",
        (1, 1),
        (1, 1),
        &[opt("alpha", Float), opt("gamma", Float)],
    )
    .infer(same),
    OpDef::new(
        "HardSigmoid",
        (1, 1),
        (1, 1),
        &[opt("alpha", Float), opt("beta", Float)],
    )
    .infer(same),
    OpDef::new(
        "Shrink",
        (1, 1),
        (1, 1),
        &[opt("bias", Float), opt("lambd", Float)],
    )
    .infer(same),
    OpDef::new(
        "Clip",
        (1, 3),
        (1, 1),
        &[opt("min", Float), opt("max", Float)],
    )
    .infer(same),
    OpDef::new(
        "Dropout",
        (1, 3),
        (1, 2),
        &[opt("ratio", Float), opt("seed", Int)],
    )
    .infer(infer_dropout),
    OpDef::new("Not", (1, 1), (1, 1), &[])
        .infer(to_bool)
        .eval(eval_not),
    unary_op("IsNaN").infer(to_bool),
    OpDef::new(
        "IsInf",
        (1, 1),
        (1, 1),
        &[opt("detect_negative", Int), opt("detect_positive", Int)],
    )
    .infer(infer_isinf),
    binary_op("Add")
        .propagate(propagate_binary)
        .eval(eval_binary),
    binary_op("Sub")
        .propagate(propagate_binary)
        .eval(eval_binary),
    binary_op("Mul")
        .propagate(propagate_binary)
        .eval(eval_binary),
    binary_op("Div")
        .propagate(propagate_binary)
        .eval(eval_binary),
    binary_op("Pow").eval(eval_binary),
    OpDef::new("Mod", BINARY, (1, 1), &[opt("fmod", Int)])
        .infer(broadcasting)
        .broadcasting()
        .eval(eval_binary),
    OpDef::new("BitShift", BINARY, (1, 1), &[req("direction", Str)])
        .infer(broadcasting)
        .broadcasting(),
    binary_op("PRelu"),
    binary_op("BitwiseAnd"),
    binary_op("BitwiseOr"),
    binary_op("BitwiseXor"),
    OpDef::new("Max", (1, MANY), (1, 1), &[])
        .infer(broadcasting)
        .broadcasting()
        .propagate(propagate_binary)
        .eval(eval_variadic),
    OpDef::new("Min", (1, MANY), (1, 1), &[])
        .infer(broadcasting)
        .broadcasting()
        .propagate(propagate_binary)
        .eval(eval_variadic),
    OpDef::new("Sum", (1, MANY), (1, 1), &[])
        .infer(broadcasting)
        .broadcasting()
        .eval(eval_variadic),
    OpDef::new("Mean", (1, MANY), (1, 1), &[])
        .infer(broadcasting)
        .broadcasting(),
    compare_op("Equal").propagate(propagate_binary),
    compare_op("Less").propagate(propagate_binary),
    compare_op("Greater").propagate(propagate_binary),
    compare_op("LessOrEqual"),
    compare_op("GreaterOrEqual"),
    OpDef::new("And", BINARY, (1, 1), &[])
        .infer(broadcasting_bool)
        .broadcasting()
        .eval(eval_logic),
    OpDef::new("Or", BINARY, (1, 1), &[])
        .infer(broadcasting_bool)
        .broadcasting()
        .eval(eval_logic),
    OpDef::new("Xor", BINARY, (1, 1), &[])
        .infer(broadcasting_bool)
        .broadcasting()
        .eval(eval_logic),
    OpDef::new("Where", (3, 3), (1, 1), &[])
        .infer(infer_where)
        .broadcasting()
        .propagate(propagate_where)
        .eval(eval_where),
    OpDef::new(
        "Cast",
        (1, 1),
        (1, 1),
        &[req("to", Int), opt("saturate", Int)],
    )
    .check(check_cast)
    .infer(infer_cast)
    .propagate(propagate_cast)
    .broadcasting()
    .eval(eval_cast),
    OpDef::new("CastLike", (2, 2), (1, 1), &[opt("saturate", Int)])
        .infer(infer_cast_like)
        .eval(eval_cast_like),
];
