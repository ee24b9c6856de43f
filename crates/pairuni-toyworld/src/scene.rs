//! Scenes: 1–4 coloured shapes on a 3×3 grid, at most one per cell, and the relations cells imply.

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A shape an object can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A filled disc.
    Circle,
    /// A filled axis-aligned square.
    Square,
    /// A filled isosceles triangle pointing up.
    Triangle,
}

impl Shape {
    /// Every shape, in index order.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The English singular noun ("circle"); also the GenEval class name.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// The English plural noun ("circles").
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
        }
    }

    /// Parses a singular noun.
    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Parses a plural noun.
    pub fn from_plural(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.plural() == name)
    }

    /// Position in [`Shape::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A colour an object can have; pure, well separated palette entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// Purple.
    Purple,
    /// Orange.
    Orange,
}

/// The canvas background (white).
pub const BACKGROUND: [u8; 3] = [255, 255, 255];

impl Colour {
    /// Every colour, in index order.
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
    ];

    /// The English name ("red"); also the GenEval `color` value.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    /// Parses an English colour name.
    pub fn from_name(name: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The palette value used by the renderer and the detector.
    ///
    /// Chosen so every pair (and each colour and the background) is at least ~80 apart in RGB, which leaves
    /// the detector a wide margin on noisy model output.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 170, 50],
            Colour::Blue => [30, 60, 230],
            Colour::Yellow => [240, 220, 30],
            Colour::Purple => [150, 40, 190],
            Colour::Orange => [250, 140, 20],
        }
    }

    /// Position in [`Colour::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A cell of the 3×3 grid; row 0 is the top, column 0 the left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cell {
    /// Row, 0..3 from the top.
    pub row: u8,
    /// Column, 0..3 from the left.
    pub col: u8,
}

const CELL_NAMES: [&str; 9] = [
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
];

impl Cell {
    /// A cell, or `None` when row or column is outside 0..3.
    pub fn new(row: u8, col: u8) -> Option<Cell> {
        (row < 3 && col < 3).then_some(Cell { row, col })
    }

    /// Row-major index 0..9.
    pub fn index(self) -> usize {
        usize::from(self.row) * 3 + usize::from(self.col)
    }

    /// The cell with row-major index `i` (0..9).
    pub fn from_index(i: usize) -> Option<Cell> {
        (i < 9).then_some(Cell {
            row: (i / 3) as u8,
            col: (i % 3) as u8,
        })
    }

    /// All nine cells in row-major order.
    pub fn all() -> impl Iterator<Item = Cell> {
        (0..9).filter_map(Cell::from_index)
    }

    /// English name used in captions ("top left", "center", …).
    pub fn name(self) -> &'static str {
        CELL_NAMES[self.index()]
    }

    /// Parses a name from [`Cell::name`].
    pub fn from_name(name: &str) -> Option<Cell> {
        CELL_NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(Cell::from_index)
    }
}

/// A spatial relation between two objects, defined by their cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Relation {
    /// A's column is smaller than B's.
    LeftOf,
    /// A's column is larger than B's.
    RightOf,
    /// A's row is smaller than B's.
    Above,
    /// A's row is larger than B's.
    Below,
}

impl Relation {
    /// Every relation.
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    /// The English phrase, identical to GenEval's position keywords ("left of", "above", …).
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// Parses a phrase from [`Relation::phrase`].
    pub fn from_phrase(s: &str) -> Option<Relation> {
        Relation::ALL.into_iter().find(|r| r.phrase() == s)
    }

    /// Whether object in cell `a` stands in this relation to object in cell `b`.
    pub fn holds(self, a: Cell, b: Cell) -> bool {
        match self {
            Relation::LeftOf => a.col < b.col,
            Relation::RightOf => a.col > b.col,
            Relation::Above => a.row < b.row,
            Relation::Below => a.row > b.row,
        }
    }
}

/// A colour–shape pair: the "object class" of captions, questions and toy-POPE ("red circle").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Kind {
    /// Colour.
    pub colour: Colour,
    /// Shape.
    pub shape: Shape,
}

impl Kind {
    /// All 18 kinds, colour-major.
    pub fn all() -> impl Iterator<Item = Kind> {
        Colour::ALL.into_iter().flat_map(|colour| {
            Shape::ALL
                .into_iter()
                .map(move |shape| Kind { colour, shape })
        })
    }

    /// Index 0..18 in [`Kind::all`] order.
    pub fn index(self) -> usize {
        self.colour.index() * 3 + self.shape.index()
    }

    /// "red circle".
    pub fn phrase(self) -> String {
        format!("{} {}", self.colour.name(), self.shape.name())
    }

    /// "a red circle" / "an orange square".
    pub fn with_article(self) -> String {
        format!("{} {}", article(self.colour.name()), self.phrase())
    }
}

/// "a" or "an" for the word that follows.
pub fn article(next_word: &str) -> &'static str {
    if next_word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// One object of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Object {
    /// Shape.
    pub shape: Shape,
    /// Colour (serialised as `color`, GenEval's spelling).
    #[serde(rename = "color")]
    pub colour: Colour,
    /// Grid cell.
    pub cell: Cell,
}

impl Object {
    /// Its colour–shape kind.
    pub fn kind(&self) -> Kind {
        Kind {
            colour: self.colour,
            shape: self.shape,
        }
    }
}

/// Why a list of objects is not a scene.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SceneError {
    /// Two objects in one cell.
    #[error("two objects in cell {0:?} (at most one object per cell)")]
    CellTaken(Cell),
}

/// Which side of the pool/benchmark divide a scene belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training pools (understanding and generation).
    Pool,
    /// Held-out benchmarks.
    Bench,
}

/// A scene: objects sorted by cell, at most one per cell (0–9 objects; generators use 1–4).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Scene {
    objects: Vec<Object>,
}

impl Scene {
    /// Builds a scene; objects are sorted by cell so equal scenes compare equal.
    pub fn new(mut objects: Vec<Object>) -> Result<Scene, SceneError> {
        objects.sort_by_key(|o| o.cell);
        if let Some(w) = objects.windows(2).find(|w| w[0].cell == w[1].cell) {
            return Err(SceneError::CellTaken(w[0].cell));
        }
        Ok(Scene { objects })
    }

    /// The objects, sorted by cell (row-major).
    pub fn objects(&self) -> &[Object] {
        &self.objects
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// True when the scene has no object.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// A uniformly random scene with `min..=max` objects (clamped to 1..=9) in distinct random cells.
    pub fn random<R: Rng + ?Sized>(rng: &mut R, min: usize, max: usize) -> Scene {
        let max = max.clamp(1, 9);
        let min = min.clamp(1, max);
        let n = rng.random_range(min..=max);
        let mut cells: Vec<Cell> = Cell::all().collect();
        cells.shuffle(rng);
        let objects = cells[..n]
            .iter()
            .map(|&cell| Object {
                shape: Shape::ALL[rng.random_range(0..3)],
                colour: Colour::ALL[rng.random_range(0..6)],
                cell,
            })
            .collect();
        Scene::new(objects).expect("distinct cells by construction")
    }

    /// Objects matching an optional colour and an optional shape.
    pub fn matching(&self, colour: Option<Colour>, shape: Option<Shape>) -> Vec<Object> {
        self.objects
            .iter()
            .filter(|o| colour.is_none_or(|c| o.colour == c) && shape.is_none_or(|s| o.shape == s))
            .copied()
            .collect()
    }

    /// Number of objects matching an optional colour and an optional shape.
    pub fn count(&self, colour: Option<Colour>, shape: Option<Shape>) -> usize {
        self.matching(colour, shape).len()
    }

    /// Whether an object of this kind is present.
    pub fn contains(&self, kind: Kind) -> bool {
        self.count(Some(kind.colour), Some(kind.shape)) > 0
    }

    /// The distinct kinds present, sorted.
    pub fn kinds(&self) -> Vec<Kind> {
        let mut kinds: Vec<Kind> = self.objects.iter().map(Object::kind).collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }

    /// A canonical text key: equal keys ⇔ equal scenes.
    pub fn key(&self) -> String {
        self.objects
            .iter()
            .map(|o| format!("{}:{}:{}", o.cell.index(), o.colour.name(), o.shape.name()))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The split this scene belongs to.
    ///
    /// A fixed arithmetic rule rather than a hash so that every prompt has scenes on both sides: summing
    /// cell, colour and shape indices and taking the residue mod 5 puts ~1/5 of all scenes in the benchmark
    /// side, and any nine consecutive cell sums (e.g. one object moved over all cells) hit every residue.
    pub fn split(&self) -> Split {
        let sum: usize = self
            .objects
            .iter()
            .map(|o| o.cell.index() + o.colour.index() + o.shape.index())
            .sum();
        if sum.is_multiple_of(5) {
            Split::Bench
        } else {
            Split::Pool
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn scene_rejects_shared_cell_and_sorts() {
        let c = Cell::new(1, 1).unwrap();
        let o = Object {
            shape: Shape::Circle,
            colour: Colour::Red,
            cell: c,
        };
        assert_eq!(Scene::new(vec![o, o]), Err(SceneError::CellTaken(c)));
        let a = Object {
            cell: Cell::new(2, 0).unwrap(),
            ..o
        };
        let s = Scene::new(vec![a, o]).unwrap();
        assert_eq!(s.objects()[0].cell, c);
    }

    #[test]
    fn names_round_trip() {
        for c in Cell::all() {
            assert_eq!(Cell::from_name(c.name()), Some(c));
        }
        for s in Shape::ALL {
            assert_eq!(Shape::from_name(s.name()), Some(s));
            assert_eq!(Shape::from_plural(s.plural()), Some(s));
        }
        for c in Colour::ALL {
            assert_eq!(Colour::from_name(c.name()), Some(c));
        }
        assert_eq!(
            Kind {
                colour: Colour::Orange,
                shape: Shape::Square
            }
            .with_article(),
            "an orange square"
        );
    }

    #[test]
    fn both_splits_are_populated() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let bench = (0..5000)
            .filter(|_| Scene::random(&mut rng, 1, 4).split() == Split::Bench)
            .count();
        assert!((700..1300).contains(&bench), "bench share {bench}/5000");
    }
}
